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

Answering and scoring is `systems.evaluate_system`, which `compare` uses as well.
"""

from __future__ import annotations

import json

from rich.table import Table

from specialize.config import EvalConfig
from specialize.errors import UserError
from specialize.evaluate.systems import (console, evaluate_system, judge_config, load_test_examples, output_folder,
                                         run_settings, stdout_console, warm_up)
from specialize.evaluate.tasks import detect_task, load_predictions, score
from specialize.files import write_json, write_jsonl
from specialize.progress import progress_bar


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
        # a test set whose answers are tool calls is scored as tool_call unless another task is asked for
        cfg = cfg.model_copy(update={"task": detect_task(cfg.task, [ref for r in rows for ref in r["reference"]])})
        metrics, _ = score(cfg.task, rows)
    elif cfg.model and cfg.data:
        examples = load_test_examples(cfg.data, run_settings(cfg.model).get("system_prompt"))
        cfg = cfg.model_copy(update={"task": detect_task(cfg.task, [e.reference for e in examples])})
        metrics, rows = _eval_model(cfg, examples)
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
        write_json(out / "metrics.json", metrics)
    if cfg.json_output:
        print(json.dumps(metrics), flush=True)
    else:
        stdout_console().print(metrics_table(metrics, title=f"{cfg.model or cfg.predictions} ({cfg.task})"))
    return metrics


def _eval_model(cfg: EvalConfig, examples) -> tuple[dict, list[dict]]:
    """Answer `examples` (asked with the run's system prompt, if it trained with one) and score them."""
    from specialize.generate import Generator

    retriever = None
    if cfg.docs:
        from specialize.retrieval import Retriever

        retriever = Retriever.build(cfg.docs)
    console.print(f"eval: {len(examples)} examples from {cfg.data}, model {cfg.model}"
                  + (f", RAG over {cfg.docs} (top {cfg.top_k})" if retriever else ""), markup=False, highlight=False)
    generator = Generator.load(cfg.model, trust_remote_code=cfg.trust_remote_code)
    warm_up(generator)
    with progress_bar() as progress:
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
