"""Rewards for sampled answers: what GRPO (`--reward`) maximises and what `specialize pairs` (`--grade`)
ranks answers by. One module, so a pair's grade and a GRPO reward mean the same thing.

    rewards = Rewards(["f1", "stop"])
    scores = rewards.score(samples)        # {"f1": [...], "stop": [...]}, one value per sample
    total = rewards.total(scores)          # summed per sample (TRL sums reward functions the same way)

Built in (each in [0, 1], from the project's own metrics, `evaluate.metrics`):
- `exact_match`, `f1`: SQuAD-normalised exact match and token F1 against the reference answer;
- `json`: the answer is one JSON object;
- `stop`: the answer ended by itself (end of turn) within the token budget, not cut off;
- `length`: how close the answer's length in words is to the reference's (shorter / longer);
- `judge`: the LLM judge's 1-5 rating (`evaluate.judge`), rescaled to [0, 1]; unparsable verdicts score 0.

`module:function` names your own Python code, loaded by import like `python -c "import module"`
(the current folder first on the path), never from the data. It is called once per batch in
TRL's reward-function style and must return one number per completion:

    def my_reward(prompts: list[str], completions: list[str], reference: list[str], **kwargs) -> list[float]

`prompts` are the last user turns, `reference` the expected answers; kwargs also hold
`finish_reason` ("stop" or "length") and `completion_tokens`.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from specialize.errors import UserError
from specialize.evaluate import metrics

BUILTIN = ("exact_match", "f1", "json", "stop", "length", "judge")


@dataclass
class Sample:
    """One sampled answer to one prompt, with what it is graded against."""

    prompt: list[dict[str, Any]]  # the conversation before the answer
    completion: str
    reference: str
    finish_reason: str = "stop"  # "stop": ended by itself; "length": cut at the token budget
    completion_tokens: int = 0

    @property
    def question(self) -> str:
        return next((m.get("content") or "" for m in reversed(self.prompt) if m["role"] == "user"), "")


def length_closeness(prediction: str, reference: str) -> float:
    """min/max of the two word counts: 1 for the reference's length, 0 for an empty answer."""
    a, b = metrics.word_count(prediction), metrics.word_count(reference)
    return 1.0 if a == b else min(a, b) / max(a, b)


_PER_SAMPLE: dict[str, Callable[[Sample], float]] = {
    "exact_match": lambda s: metrics.exact_match(s.completion, [s.reference]),
    "f1": lambda s: metrics.token_f1(s.completion, [s.reference]),
    "json": lambda s: float(metrics.parse_json_object(s.completion) is not None),
    "stop": lambda s: float(s.finish_reason == "stop"),
    "length": lambda s: length_closeness(s.completion, s.reference),
}


def load_function(spec: str, flag: str = "--reward") -> Callable:
    """`module:function` → the function, imported as Python imports it (the current folder first)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"{flag} {spec!r}: expected one of {', '.join(BUILTIN)} or module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` and the interactive interpreter do
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only the module asked for (or a package on its dotted path) missing means "no such module";
        # `numpyxrew` failing on its own `import numpyx` is an error inside the user's module.
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise UserError(f"{flag} {spec}: no module named '{e.name}' (looked in the current folder "
                            "and on the Python path)") from None
        raise UserError(f"{flag} {spec}: module '{module_name}' failed to import: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{flag} {spec}: module '{module_name}' ({getattr(module, '__file__', '?')}) has no "
                        f"function '{name}'")
    return function


class Rewards:
    """Named reward functions over batches of samples. Use as a context manager (closes a judge)."""

    def __init__(self, names: list[str], *, judge_url: str | None = None, judge_model: str | None = None,
                 flag: str = "--reward"):
        self.names = list(names) or ["f1"]
        if len(set(self.names)) != len(self.names):
            raise UserError(f"{flag} lists a reward twice: {', '.join(self.names)}")
        self.flag, self._judge = flag, None
        self._functions: dict[str, Callable] = {}
        for name in self.names:
            if name in _PER_SAMPLE:
                continue
            if name == "judge":
                if not judge_url or not judge_model:
                    raise UserError(f"{flag} judge needs --judge-url and --judge-model (an OpenAI-compatible endpoint)")
                from specialize.evaluate.judge import Judge

                self._judge = Judge(judge_url, judge_model)
            elif ":" in name:
                self._functions[name] = load_function(name, flag)
            else:
                raise UserError(f"{flag} {name!r}: expected one of {', '.join(BUILTIN)} or module:function")

    def __enter__(self) -> Rewards:  # noqa: PYI034 (typing.Self is Python 3.11+; we support 3.10)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._judge is not None:
            self._judge.close()

    def score(self, samples: list[Sample]) -> dict[str, list[float]]:
        """Every reward function's value for every sample, in the samples' order."""
        return {name: self._score_one(name, samples) for name in self.names}

    @staticmethod
    def total(scores: dict[str, list[float]]) -> list[float]:
        """The rewards summed per sample."""
        return [sum(values) for values in zip(*scores.values())]

    def _score_one(self, name: str, samples: list[Sample]) -> list[float]:
        if name in _PER_SAMPLE:
            return [_PER_SAMPLE[name](s) for s in samples]
        if name == "judge":
            return self._judged(samples)
        values = self._functions[name](
            prompts=[s.question for s in samples], completions=[s.completion for s in samples],
            reference=[s.reference for s in samples], finish_reason=[s.finish_reason for s in samples],
            completion_tokens=[s.completion_tokens for s in samples])
        values = list(values) if values is not None else []
        if len(values) != len(samples):
            raise UserError(f"{self.flag} {name} returned {len(values)} value(s) for {len(samples)} completions "
                            "(one number per completion)")
        out = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{self.flag} {name} returned {value!r}; each reward must be a finite number")
            out.append(float(value))
        return out

    def _judged(self, samples: list[Sample]) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor

        from specialize.evaluate.judge import judge_messages, parse_score

        prompts = [judge_messages("qa", s.question, s.reference, s.completion) for s in samples]
        with ThreadPoolExecutor(max_workers=self._judge.concurrency) as pool:
            verdicts = list(pool.map(self._judge.verdict, prompts))
        ratings = [parse_score(v) for v in verdicts]
        return [0.0 if r is None else (r - 1) / 4 for r in ratings]
