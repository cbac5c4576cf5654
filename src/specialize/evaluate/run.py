"""`specialize eval`: metrics for one model (or a predictions file) on one test set.

    specialize eval --model runs/faq --data test.jsonl --task qa --out runs/faq/eval
    specialize eval --model runs/faq --data test.jsonl --docs docs/ --json
    specialize eval --predictions other_system.jsonl --task qa --json

With a model, every test example's prompt (everything before its last assistant turn) is
rendered with the model's own template and answered greedily in batches; with `--docs`, the
last user message becomes `rag_prompt(question, top_k passages)`, the same prompt fine-tuning
with `rag_docs` trains on. `--out` gets `predictions.jsonl` (one row per example: the messages
sent, prediction, reference, stop, tokens; re-scorable with `--predictions`) and `metrics.json`.

Output: `--json` prints one JSON object (the metrics) on stdout and nothing else; otherwise a
table goes to stdout. Progress and logs always go to stderr.

`evaluate_system` is the reusable part (compare and the demo call it): one generator, one
list of examples, optional retriever and few-shot turns → metrics, per-example rows, cost.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specialize.config import EvalConfig
from specialize.data.formats import Example, load_examples
from specialize.errors import UserError
from specialize.evaluate.tasks import load_predictions, score

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


def make_progress(enabled: bool = True) -> Progress:
    """A progress bar on stderr (stdout stays clean for --json)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=not enabled, transient=False)


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
    from specialize.generate import ContextOverflow  # here: scoring a predictions file needs no torch

    start = time.perf_counter()
    conversations, contexts = build_conversations(examples, retriever, top_k)
    on_batch = None
    if progress is not None:
        bar = progress.add_task(description, total=len(conversations))

        def on_batch(done: int, total: int) -> None:
            progress.update(bar, completed=done)

    # Greedy, in batches of similar prompt length; each prompt is rendered and tokenised once.
    try:
        completions = generator.generate(conversations, max_new_tokens=max_new_tokens, temperature=0.0,
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
        rows.append({"index": i, "question": question_of(example), "prediction": c.text,
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
    path = Path(model) / "config.yaml"
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate a model on a test set, or score a predictions file; return the metrics.

    The returned dict is what `--json` prints: the task metrics of `score`, plus (with a model)
    `latency_s_per_example`, `prompt_tokens_per_example`, `completion_tokens_per_example`,
    plus `judge_*` when a judge is configured.
    """
    if cfg.predictions and (cfg.model or cfg.data):
        raise UserError("give either --predictions FILE, or --model and --data, not both")
    out = output_folder(cfg.out) if cfg.out else None
    judge_config(cfg)  # a half-configured judge fails now, not after every answer was generated
    if cfg.predictions:
        rows = load_predictions(cfg.predictions)
        metrics, _ = score(cfg.task, rows)
    elif cfg.model and cfg.data:
        metrics, rows = _eval_model(cfg)
        if out:
            write_jsonl(out / "predictions.jsonl", rows)
    else:
        raise UserError("nothing to evaluate: give --model RUN and --data FILE, or --predictions FILE")
    judged = judge_config(cfg)
    if judged:
        from specialize.evaluate.judge import Judge

        with Judge(*judged) as judge:
            metrics.update(judge.judge_rows(cfg.task, rows, out / "judge.jsonl" if out else None))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if cfg.json_output:
        print(json.dumps(metrics), flush=True)
    else:
        stdout_console().print(metrics_table(metrics, title=f"{cfg.model or cfg.predictions} ({cfg.task})"))
    return metrics


def _eval_model(cfg: EvalConfig) -> tuple[dict, list[dict]]:
    from specialize.generate import Generator

    # a run trained with a system prompt is asked with it, as in training
    examples = load_test_examples(cfg.data, run_settings(cfg.model).get("system_prompt"))
    retriever = None
    if cfg.docs:
        from specialize.retrieval import Retriever

        retriever = Retriever.build(cfg.docs)
    console.print(f"eval: {len(examples)} examples from {cfg.data}, model {cfg.model}"
                  + (f", RAG over {cfg.docs} (top {cfg.top_k})" if retriever else ""), markup=False, highlight=False)
    generator = Generator.load(cfg.model, trust_remote_code=cfg.trust_remote_code)
    warm_up(generator)
    with make_progress() as progress:
        result = evaluate_system(generator, examples, cfg.task, retriever, top_k=cfg.top_k,
                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                 progress=progress, description="eval")
    metrics = dict(result.metrics)
    metrics.update(latency_s_per_example=result.latency_s_per_example,
                   prompt_tokens_per_example=result.prompt_tokens_per_example,
                   completion_tokens_per_example=result.completion_tokens_per_example)
    return metrics, result.rows


def metrics_table(metrics: dict, title: str = "") -> Table:
    """Scalar metrics as a two-column table (nested ones such as error_counts are flattened)."""
    table = Table(title=title or None)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, dict) and key == "error_counts":
            for name, count in value.items():
                table.add_row(f"errors: {name}", str(count))
        elif isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, (int, str)):
            table.add_row(key, str(value))
    return table
