"""The Playground: chat with a run, its base, or the run with RAG, answers streamed as they come.

Answers come from `Generator.stream_ids`, the code `specialize chat` and `serve`'s streaming
use, with the conversation rendered by the model's own template (`Generator.prompt_ids`). RAG
is compare's `base+rag`/`finetuned+rag` prompt: the last user message becomes
`retrieval.rag_prompt(question, retriever.search(question, top_k))`.

One answer is generated at a time (a CPU has no room for two), in a worker thread; the pieces
reach the event loop through an asyncio queue and go to the page as NDJSON lines
(`{"passages": [...]}`, then `{"text": piece}`..., then `{"done": {...}}` or `{"error": msg}`).
A page that goes away stops its answer at the next token.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from specialize.errors import UserError
from specialize.rundir import RunDir
from specialize.studio.workspace import Workspace

KEPT_MODELS = 3  # run, base and one more stay loaded; older ones are dropped
SYSTEMS = ("run", "base", "rag")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # org/name or name


class Playground:
    """Loaded generators and retrievers, and the one lock that lets a single answer run at a time."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._generators: OrderedDict[str, Any] = OrderedDict()
        self._retrievers: dict[str, Any] = {}
        self._lock = threading.Lock()

    # -- what to load ----------------------------------------------------------------------------
    def _run(self, run_name: str) -> RunDir:
        """The run folder, refused unless specialize made it (any folder can hold a train_summary.json)."""
        path = self.workspace.resolve(run_name, must_exist=True)
        if not RunDir.is_run(path):
            raise UserError(f"{run_name} is not a run folder")
        return RunDir(path)

    def _recorded(self, run_name: str, what: str, value: str) -> Path | None:
        """A path a run recorded, confined to the workspace like one typed in the browser.

        None when `value` is not a path at all (a hub id such as `org/name`): it names no file in the
        workspace nor, relative to the studio's folder, anywhere else, and it has a hub id's shape.
        """
        try:
            if Path(value).is_absolute():  # a run started from the command line inside the workspace
                local = self.workspace.resolve(self.workspace.relative(Path(value)))
            else:
                local = self.workspace.resolve(value)
        except (UserError, ValueError):
            raise UserError(f"{run_name} records {what} '{value}', outside the workspace; "
                            "the studio only loads files from its workspace") from None
        if local.exists():
            return local
        if Path(value).exists() or not HUB_ID.fullmatch(value):
            raise UserError(f"{run_name} records {what} '{value}', which is not in the workspace")
        return None

    def model_ref(self, run_name: str, system: str) -> str:
        """The model folder (or hub id) that answers for `system` of the run."""
        run = self._run(run_name)
        if system != "base":
            if not run.model.is_dir():
                raise UserError(f"{run_name} has no model yet (training has not finished)")
            return str(run.path)
        base = (run.read_summary() or {}).get("base") or run.read_config().get("base")
        if not base or not isinstance(base, str):
            raise UserError(f"{run_name} does not record its base")
        # Recorded by the run, but a run folder's files can be uploaded or edited: a path is
        # confined to the workspace; a hub id that names no file is loaded from the local cache only.
        local = self._recorded(run_name, "its base", base)
        return str(local) if local else base

    def docs_path(self, run_name: str, docs: str | None) -> Path:
        """Documents for RAG: the ones given, else those the run trained with (rag_docs)."""
        if docs:
            return self.workspace.resolve(docs, must_exist=True)
        recorded = self._run(run_name).read_config().get("rag_docs")
        if not recorded:
            raise UserError("pick documents for RAG (the run was not trained with rag_docs)")
        local = self._recorded(run_name, "rag_docs", str(recorded))
        if local is None:
            raise UserError(f"{run_name} records rag_docs '{recorded}', which is not in the workspace")
        return local

    def _generator(self, ref: str):
        from specialize.generate import Generator

        if ref in self._generators:
            self._generators.move_to_end(ref)
            return self._generators[ref]
        generator = Generator.load(ref)
        self._generators[ref] = generator
        while len(self._generators) > KEPT_MODELS:
            self._generators.popitem(last=False)
        return generator

    def _retriever(self, docs: Path):
        from specialize.retrieval import Retriever

        key = str(docs)
        if key not in self._retrievers:
            self._retrievers = {key: Retriever.build(docs)}  # one set of documents kept
        return self._retrievers[key]

    # -- answering -------------------------------------------------------------------------------
    def _answer(self, request: dict, emit, cancelled) -> None:
        """Runs in the worker thread: load, retrieve, stream; every outcome is emitted as one event."""
        from specialize.generate import ContextOverflow
        from specialize.retrieval import rag_prompt

        try:
            system = request.get("system", "run")
            if system not in SYSTEMS:
                raise UserError(f"system must be one of {', '.join(SYSTEMS)}")
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in request.get("messages", [])]
            if not messages or messages[-1]["role"] != "user":
                raise UserError("the conversation must end with a user message")
            run_name = str(request.get("run", ""))
            ref = self.model_ref(run_name, system)
            docs = self.docs_path(run_name, request.get("docs")) if system == "rag" else None
            with self._lock:
                generator = self._generator(ref)
                if docs is not None:
                    question = messages[-1]["content"]
                    found = self._retriever(docs).search(question, int(request.get("top_k", 3)))
                    emit({"passages": [{"source": p.source, "text": p.text} for p in found]})
                    messages[-1] = {"role": "user", "content": rag_prompt(question, found)}
                ids = generator.prompt_ids(messages)
                budget = int(request.get("max_new_tokens", 128))
                if generator.context_length is not None:  # as `generate`: the answer gets the room left
                    budget = min(budget, generator.context_length - len(ids))
                if budget < 1:
                    raise UserError("the conversation fills the model's context; clear it and start again")
                completion = generator.stream_ids(ids, max_new_tokens=budget,
                                                  temperature=float(request.get("temperature", 0.0)),
                                                  on_text=lambda piece: emit({"text": piece}), cancelled=cancelled)
            emit({"done": {"finish_reason": completion.finish_reason, "prompt_tokens": completion.prompt_tokens,
                           "completion_tokens": completion.completion_tokens, "model": ref}})
        except (UserError, ContextOverflow, OSError, ValueError, KeyError, TypeError) as e:
            emit({"error": str(e).replace(str(self.workspace.root) + "/", "")})
        # A model that fails to load or generate: the page shows why, and the studio lives on.
        except Exception as e:  # noqa: BLE001
            emit({"error": f"{type(e).__name__}: {e}"})

    async def stream(self, request: dict) -> AsyncIterator[bytes]:
        """NDJSON lines for one answer (see the module docstring)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        end = object()

        def emit(event: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def work() -> None:
            try:
                self._answer(request, emit, stop.is_set)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, end)

        threading.Thread(target=work, name="studio-playground", daemon=True).start()
        try:
            while (event := await queue.get()) is not end:
                yield (json.dumps(event) + "\n").encode()
        finally:  # finished, failed, or the page went away: stop generating
            stop.set()
