"""Evaluation: metrics by task type, error analysis, and the fine-tune-or-not recommendation.

    from specialize.evaluate import score, load_predictions, recommend
    metrics, per_example = score("qa", load_predictions("predictions.jsonl"))

- `metrics`         per-example metric functions (SQuAD EM/F1, ROUGE-L, labels, JSON fields)
- `error_analysis`  behaviour checks and per-example error categories
- `tasks`           `score(task, rows)`: which metrics each task type gets
- `scorecard`       `Scorecard` (the shape of scorecard.json), `recommend(systems)`: which system to ship, and why
- `systems`         `evaluate_system(generator, examples, task, ...)`: one system answers a test set (eval and compare)
- `run`             `run_eval(cfg)`: `specialize eval`
- `compare`         `compare(cfg)`: `specialize compare`, every system on every split → scorecard
- `report`          report.html and the terminal table of a scorecard
- `judge`           `Judge(url, model)`: LLM-as-judge over an OpenAI-compatible endpoint
- `harness`         lm-evaluation-harness command lines and results for a run
"""

from specialize.evaluate.scorecard import Scorecard, main_metric, recommend
from specialize.evaluate.tasks import TASKS, load_predictions, score

# Imported on first use: they pull in config, data and HTTP modules that scoring alone never needs.
_LAZY = {"run_eval": "run", "evaluate_system": "systems", "SystemResult": "systems", "Judge": "judge"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"specialize.evaluate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'specialize.evaluate' has no attribute '{name}'")


__all__ = ["TASKS", "Judge", "Scorecard", "SystemResult", "evaluate_system", "load_predictions", "main_metric",
           "recommend", "run_eval", "score"]
