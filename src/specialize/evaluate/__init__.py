"""Evaluation: metrics by task type, error analysis, and the fine-tune-or-not recommendation.

    from specialize.evaluate import score, load_predictions, recommend
    metrics, per_example = score("qa", load_predictions("predictions.jsonl"))

- `metrics`         per-example metric functions (SQuAD EM/F1, ROUGE-L, labels, JSON fields)
- `error_analysis`  behaviour checks and per-example error categories
- `tasks`           `score(task, rows)`: which metrics each task type gets
- `scorecard`       `recommend(systems)`: which system to ship, and why
"""

from specialize.evaluate.scorecard import main_metric, recommend
from specialize.evaluate.tasks import TASKS, load_predictions, score

__all__ = ["TASKS", "load_predictions", "main_metric", "recommend", "score"]
