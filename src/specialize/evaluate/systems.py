"""What `eval` and `compare` share: answering a test set with one system and scoring the answers.

    result = evaluate_system(generator, load_test_examples("test.jsonl"), "qa", retriever, top_k=3)
    result.metrics["f1"], result.rows[0]["prediction"], result.prompt_tokens_per_example

A system is one generator (a model with its template) plus, optionally, a retriever: with one,
the last user message of each example becomes `rag_prompt(question, top_k passages)`, the same
prompt fine-tuning with `rag_docs` trains on. Few-shot turns are added to the examples before
(`compare.with_fewshot`). Also here: reading a run's settings, the test set, the judge keys and
the output folder, so that both commands check their inputs the same way before any model runs.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from specialize.data.formats import Example, load_examples
from specialize.data.templates import Template
from specialize.errors import UserError
from specialize.rundir import RunDir
from specialize.evaluate.tasks import score

console = Console(stderr=True, markup=False)  # paths and data are printed verbatim


@dataclass
class SystemResult:
    """What one system did on one test set."""

    metrics: dict[str, Any]             # score(task, rows)[0], plus judge_* when judged
    per_example: list[dict]             # score(task, rows)[1]: per-example scores and categories
    rows: list[dict]                    # predictions.jsonl rows (messages sent, prediction, ...)
    seconds: float                      # retrieval + generation wall time
    latency_s_per_example: float        # seconds / examples (batched: a throughput cost)
    prompt_tokens_per_example: float
    completion_tokens_per_example: float
    extra: dict[str, Any] = field(default_factory=dict)


def last_user_index(messages: list[dict[str, str]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "user")


def question_of(example: Example) -> str:
    """The last user message of the example's prompt: what is retrieved for, and shown in reports."""
    prompt = example.prompt_messages
    return prompt[last_user_index(prompt)]["content"]


def build_conversations(examples: list[Example], retriever=None,
                        top_k: int = 3) -> tuple[list[list[dict[str, str]]], list[str | None]]:
    """The conversations sent to the model, and the retrieved context of each (None without RAG).

    RAG: the last user message becomes `rag_prompt(question, retriever.search(question, top_k))`,
    exactly as `finetune --rag-docs` builds training prompts. (Few-shot turns are already in the
    examples: see `compare.with_fewshot`.)
    """
    from specialize.retrieval import rag_prompt

    questions = [question_of(e) for e in examples]
    passages = retriever.search_many(questions, top_k) if retriever is not None else [None] * len(examples)
    conversations, contexts = [], []
    for example, question, found in zip(examples, questions, passages):
        messages = [dict(m) for m in example.prompt_messages]
        if found is not None:
            messages[last_user_index(messages)]["content"] = rag_prompt(question, found)
            contexts.append("\n\n".join(p.text for p in found))
        else:
            contexts.append(None)
        conversations.append(messages)
    return conversations, contexts


def with_tools(generator, tools: list[dict]):
    """A view of `generator` (same model and tokenizer) whose prompts offer `tools` in the system turn.

    The run's template renders them (`Template.render(..., tools=)`), as training rendered rows
    with a `tools` key, so a model is asked exactly the way it was taught. (Generator itself takes
    no tools; a view per tools list keeps its batching and context checks.)
    """
    template = generator.template
    if not template.renders_tools:
        raise UserError(f"the run's template {template.label} cannot render tools; tools need a template that "
                        "does (train with --template chatml, or a base whose chat template supports tools)")
    view = copy.copy(generator)
    view.template = _ToolsTemplate(template.name, template.jinja, template.origin, tuple(tools))
    return view


@dataclass(frozen=True, eq=False)
class _ToolsTemplate(Template):
    """A template that offers the same tools in every conversation it renders."""

    tools: tuple = ()

    def render(self, tokenizer, messages, add_generation_prompt, tools=None):
        return super().render(tokenizer, messages, add_generation_prompt, tools=list(tools or self.tools))


def generate_each_with_tools(generator, conversations: list[list[dict]], tools: list[list[dict] | None],
                             on_batch=None, **options):
    """`generator.generate` where each conversation offers its own tools (None: none), e.g. a tool-calling
    test set's `Example.tools`. Conversations sharing a tools list are generated together."""
    from specialize.generate import ContextOverflow

    groups: dict[str, list[int]] = {}
    for i, offered in enumerate(tools):
        # Key order kept: each row is rendered with the group's first list, as training rendered it
        groups.setdefault(json.dumps(offered) if offered else "", []).append(i)
    if list(groups) == [""]:
        return generator.generate(conversations, on_batch=on_batch, **options)
    completions: list = [None] * len(conversations)
    done = 0
    for key, indices in groups.items():
        view = with_tools(generator, tools[indices[0]]) if key else generator
        progress = (lambda d, _, offset=done: on_batch(offset + d, len(conversations))) if on_batch else None
        try:
            answers = view.generate([conversations[i] for i in indices], on_batch=progress, **options)
        except ContextOverflow as e:  # name the conversation in the caller's numbering
            raise ContextOverflow(e.prompt_tokens, e.max_new_tokens, e.context, indices[e.index]) from None
        for i, answer in zip(indices, answers):
            completions[i] = answer
        done += len(indices)
    return completions


def warm_up(generator) -> None:
    """One tiny generation, so one-time start-up costs (allocator, kernels) are not timed as latency."""
    generator.generate([[{"role": "user", "content": "Hello"}]], max_new_tokens=2, batch_size=1)


def stdout_console() -> Console:
    """Results go to stdout; when it is a file or pipe, tables get room instead of rich's 80 columns."""
    out = Console(markup=False)
    if not out.is_terminal:
        out = Console(width=200, markup=False)
    return out


def evaluate_system(generator, examples: list[Example], task: str, retriever=None, *, top_k: int = 3,
                    max_new_tokens: int = 64,
                    batch_size: int = 32, progress: Progress | None = None,
                    description: str = "generate") -> SystemResult:
    """Answer every example with one generator and score the answers.

    Args:
        generator: a `specialize.generate.Generator` (its template renders the prompts).
        examples: test examples with an assistant answer (`Example.reference`).
        task: one of `specialize.evaluate.TASKS`.
        retriever: a retriever for RAG prompts, or None.
        progress: a rich Progress to add a bar to (None: quiet).
        description: names the system and split (compare: "finetuned+rag / test") in the bar and errors.

    Raises:
        UserError: an example's prompt (with its retrieved context) plus `max_new_tokens` does not
            fit the model's context; it names the example's file and line.
    """
    from specialize.generate import ContextOverflow, split_reasoning  # here: scoring a predictions file needs no torch

    start = time.perf_counter()
    conversations, contexts = build_conversations(examples, retriever, top_k)
    on_batch = None
    if progress is not None:
        bar = progress.add_task(description, total=len(conversations))

        def on_batch(done: int, total: int) -> None:
            progress.update(bar, completed=done)

    # Greedy, in batches of similar prompt length; each prompt is rendered and tokenised once.
    try:
        completions = generate_each_with_tools(generator, conversations, [e.tools for e in examples],
                                               max_new_tokens=max_new_tokens, temperature=0.0,
                                               batch_size=batch_size, on_batch=on_batch)
    except ContextOverflow as e:  # checked before anything is generated
        raise UserError(f"{description}: the prompt{' with its retrieved context' if contexts[e.index] else ''} "
                        f"is {e.prompt_tokens} tokens, which plus max_new_tokens ({max_new_tokens}) exceeds the "
                        f"model's context of {e.context} tokens; lower --max-new-tokens"
                        f"{' or --top-k' if contexts[e.index] else ''}, or shorten the example",
                        path=examples[e.index].source or None) from None
    seconds = time.perf_counter() - start
    rows = []
    for i, (example, messages, context, c) in enumerate(zip(examples, conversations, contexts, completions)):
        reasoning, answer = split_reasoning(c.text)  # a <think> block is not part of the answer scored
        rows.append({"index": i, "question": question_of(example), "prediction": answer, "reasoning": reasoning,
                     "reference": example.reference, "stopped": c.stopped, "finish_reason": c.finish_reason,
                     "context": context, "prompt_tokens": c.prompt_tokens,
                     "completion_tokens": c.completion_tokens, "source": example.source, "messages": messages})
    metrics, per_example = score(task, rows)
    n = len(rows)
    return SystemResult(metrics, per_example, rows, seconds, seconds / n,
                        sum(c.prompt_tokens for c in completions) / n,
                        sum(c.completion_tokens for c in completions) / n)


def run_settings(model: str) -> dict:
    """The resolved config.yaml of a specialize run ({} for a plain model folder or hub id)."""
    return RunDir(model).read_config()


def load_test_examples(path: str, system_prompt: str | None = None) -> list[Example]:
    """Examples of a test file; each needs an assistant answer to compare with."""
    examples = load_examples([path], system_prompt)
    if not examples:
        raise UserError("the test set is empty", path=path)
    for example in examples:
        if example.messages is None:
            raise UserError("raw text rows cannot be evaluated; a test set needs question/answer pairs "
                            "(or any conversation ending with the expected answer)", path=example.source)
    return examples


def judge_config(cfg) -> tuple[str, str] | None:
    """(url, model) when the config turns the LLM judge on (both keys set), else None."""
    url, model = getattr(cfg, "judge_url", None), getattr(cfg, "judge_model", None)
    if url and not model:
        raise UserError("judge_url is set but judge_model is not (name the model at the endpoint)",
                        field="judge_model")
    return (url, model) if url else None


def output_folder(path: str | Path) -> Path:
    """The `--out` folder, created before any model runs: a path that cannot be one fails first."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder: {e.strerror or e}", path=folder) from None
    return folder
