"""The scorecard (what `compare` writes to scorecard.json) and `recommend`: which system to ship, and why.

`Scorecard` is the file's shape: its field names are the JSON keys, so the code that writes the
file, the report that reads it and this docstring cannot drift apart.

    {"task": "qa", "base": "runs/base", "model": "runs/faq",
     "splits": {"test": "test.jsonl"},                  # split name → the --data file it came from
     "systems": [{"name": "finetuned+rag", "latency_s_per_example": 0.41,
                  "prompt_tokens_per_example": 812.0,
                  "tool_calls_per_example": null,                      # agent systems: search calls
                  "training": {"seconds": 310.0, "tokens": 1200000},   # null: no training
                  "retention": null,                                   # the run's train_summary retention
                  "splits": {"test": {"exact_match": 0.61, "f1": 0.74, "stop_rate": 0.98, "n": 200, ...}}}],
     "recommendation": {"system": "finetuned+rag", "metric": "f1", "reasons": ["...", ...]},
     "demo": {...}}                                     # `specialize demo` only

The decision is lexicographic with tolerances, so that it can be explained in a sentence each:

1. quality: the task's main metric (`main_metric`), averaged over the splits all systems share.
   Every system within `quality_margin` (absolute, 0-1 scale) of the best stays in the running;
   differences that small are noise on a test set of a few hundred examples.
2. hallucination: among those, every system within `hallucination_margin` of the lowest
   `hallucination_rate` stays (skipped when a system has no such number).
3. cost per example: the fewest prompt tokens (RAG prompts are long, and every user request pays
   for them), then the lowest latency; values within `cost_tolerance` (relative) of the
   cheapest count as equal.
4. up-front cost: the fewest training seconds (no training counts as 0), then the order given.

So when fine-tuning does not clearly beat prompting + RAG, the system without training wins; when
fine-tuned and RAG systems tie on quality, the shorter prompt wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel


class Training(BaseModel):
    """What fine-tuning a system cost up front (from its run's train_summary.json)."""

    seconds: float | None = None
    tokens: int | None = None


class SystemScore(BaseModel):
    """One system of a comparison: its scores per split and its cost per example."""

    name: str
    latency_s_per_example: float | None = None  # None: unknown (a --predictions system)
    prompt_tokens_per_example: float | None = None  # agent systems: summed over its rounds
    tool_calls_per_example: float | None = None  # agent systems only: tool calls it made per question
    training: Training | None = None  # None: no training
    retention: dict[str, Any] | None = None  # fine-tuned systems: train_summary.json's "retention", as written
    splits: dict[str, dict[str, Any]]  # split → metrics of `evaluate.score` (+ judge_* when judged)


class Recommendation(BaseModel):
    """The system to use, the metric that decided it, and the reasons in plain sentences."""

    system: str
    metric: str
    reasons: list[str]


class Scorecard(BaseModel):
    """The whole of scorecard.json (see the module docstring)."""

    task: str | None = None
    base: str | None = None
    model: str | None = None
    splits: dict[str, str] = {}
    systems: list[SystemScore] = []
    recommendation: Recommendation | None = None
    demo: dict[str, Any] | None = None  # written by `specialize demo` only

    def to_json(self) -> dict[str, Any]:
        """The scorecard as written to scorecard.json (`demo` only when set)."""
        data = self.model_dump()
        if self.demo is None:
            del data["demo"]
        return data


def _systems(systems: Sequence[SystemScore | Mapping]) -> list[SystemScore]:
    """Systems as typed objects; plain dicts (a scorecard.json read back) are validated."""
    return [SystemScore.model_validate(s) for s in systems]


# Main metric of each task, in the order looked for: field_f1 (extract, JSON), f1 (qa, extract),
# macro_f1 (classify), rouge_l (generate); accuracy / exact_match as fallbacks.
MAIN_METRICS = ("field_f1", "f1", "macro_f1", "rouge_l", "accuracy", "exact_match")
QUALITY_MARGIN = 0.02
HALLUCINATION_MARGIN = 0.02
COST_TOLERANCE = 0.10


def main_metric(systems: Sequence[SystemScore | Mapping]) -> str:
    """The first of MAIN_METRICS that every split of every system reports."""
    systems = _systems(systems)
    for metric in MAIN_METRICS:
        if all(metric in split for s in systems for split in s.splits.values()):
            return metric
    raise ValueError(f"no common quality metric (one of {', '.join(MAIN_METRICS)}) in the scorecard")


def common_splits(systems: Sequence[SystemScore | Mapping]) -> list[str]:
    """Splits every system was scored on, in the first system's order."""
    systems = _systems(systems)
    return [name for name in systems[0].splits
            if all(name in s.splits for s in systems[1:])]


def _mean_over(system: SystemScore, splits: list[str], key: str) -> float | None:
    values = [system.splits[name].get(key) for name in splits]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _keep_near_best(names: list[str], value: dict[str, float | None], lower_is_better: bool,
                    absolute: float = 0.0, relative: float = 0.0, unknown_stays: bool = True) -> list[str]:
    """Names whose value is within the tolerance of the best known one.

    Names without a value stay when `unknown_stays` (an unmeasured hallucination rate is no
    reason to drop a system); otherwise they go whenever some name has a value (an unknown
    cost, as of a `--predictions` system, can never win a cost tie-break).
    """
    known = [n for n in names if value[n] is not None]
    if not known:
        return names
    sign = 1 if lower_is_better else -1
    best = min(sign * value[n] for n in known)
    # the epsilon keeps 0.80 "within 0.02" of 0.82 despite binary floating point
    limit = best + absolute + relative * abs(best) + 1e-9
    return [n for n in names if (value[n] is None and unknown_stays)
            or (value[n] is not None and sign * value[n] <= limit)]


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def recommend(systems: Sequence[SystemScore | Mapping], *, quality_margin: float = QUALITY_MARGIN,
              hallucination_margin: float = HALLUCINATION_MARGIN,
              cost_tolerance: float = COST_TOLERANCE) -> dict:
    """The system to use and the reasons, from scorecard systems (typed, or as read from JSON).

    Returns:
        the `Recommendation` as JSON: {"system": name, "metric": main metric, "reasons": [sentence, ...]}
    """
    if not systems:
        raise ValueError("recommend needs at least one system")
    systems = _systems(systems)
    metric = main_metric(systems)
    splits = common_splits(systems) or list(systems[0]["splits"])
    by_name = {s.name: s for s in systems}
    names = list(by_name)
    quality = {n: _mean_over(by_name[n], splits, metric) or 0.0 for n in names}
    halluc = {n: _mean_over(by_name[n], splits, "hallucination_rate") for n in names}
    tokens = {n: by_name[n].prompt_tokens_per_example for n in names}
    latency = {n: by_name[n].latency_s_per_example for n in names}
    train_s = {n: float(by_name[n].training.seconds or 0.0) if by_name[n].training else 0.0 for n in names}

    best = max(names, key=lambda n: quality[n])  # first of equals, in the order given
    split_list = ", ".join(splits)
    others = "; ".join(f"{n} {_fmt(quality[n])}" for n in names if n != best)
    reasons = [f"{best} has the best {metric} averaged over {split_list}: {_fmt(quality[best])}"
               + (f" ({others})." if others else ".")]

    candidates = _keep_near_best(names, quality, lower_is_better=False, absolute=quality_margin)
    candidates = _keep_near_best(candidates, halluc, lower_is_better=True,
                                 absolute=hallucination_margin)
    candidates = _keep_near_best(candidates, tokens, lower_is_better=True, relative=cost_tolerance,
                                 unknown_stays=False)
    candidates = _keep_near_best(candidates, latency, lower_is_better=True, relative=cost_tolerance,
                                 unknown_stays=False)
    chosen = min(candidates, key=lambda n: (train_s[n], names.index(n)))

    if chosen != best:
        unknown_cost = tokens[best] is None or latency[best] is None
        why = (f"{best}'s cost per example is unknown, so the measured one is preferred" if unknown_cost
               else "so the cheaper or more faithful system is preferred")
        reasons.append(f"{chosen} is within {quality_margin} of it ({_fmt(quality[chosen])}), {why}.")
    if halluc[chosen] is not None:
        others = [n for n in names if n != chosen and halluc[n] is not None]
        text = f"{chosen} hallucination rate: {_fmt(halluc[chosen])}"
        if others:
            text += " (" + "; ".join(f"{n} {_fmt(halluc[n])}" for n in others) + ")"
        reasons.append(text + ".")
    if tokens[chosen] is not None and latency[chosen] is not None:
        others = [n for n in names if n != chosen and tokens[n] is not None and latency[n] is not None]
        text = (f"{chosen} costs {tokens[chosen]:.0f} prompt tokens and "
                f"{latency[chosen]:.3f} s per example")
        if others:
            text += " (" + "; ".join(f"{n} {tokens[n]:.0f} tokens, {latency[n]:.3f} s"
                                     for n in others) + ")"
        reasons.append(text + ".")
    training = by_name[chosen].training
    if training:
        reasons.append(f"{chosen} needed fine-tuning up front: {training.seconds or 0:.0f} s "
                       f"on {training.tokens or 0:,} tokens.")
    else:
        reasons.append(f"{chosen} needs no training.")
    # Averages hide splits where another system is clearly better (typically: RAG on questions
    # about documents the model never trained on); say so, the user may care about that split.
    for split in splits:
        score = {n: by_name[n].splits[split].get(metric) for n in names}
        rival = max(names, key=lambda n: score[n] if score[n] is not None else float("-inf"))
        if score[chosen] is not None and score[rival] is not None \
                and score[rival] > score[chosen] + quality_margin:
            reasons.append(f"On split {split}, {rival} is better: {metric} "
                           f"{_fmt(score[rival])} vs {_fmt(score[chosen])}.")
    return Recommendation(system=chosen, metric=metric, reasons=reasons).model_dump()
