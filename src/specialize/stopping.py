"""When an answer ends: stop strings and cancellation per row, as transformers stopping criteria,
and how much of a streamed answer may be shown before a stop string could still complete.

`model.generate` pads a row once it has finished; `ended[row]` records how many new tokens the row
had by then, so `Generator` cuts each answer where it really ended (a sampled pad token at the
budget is not an end).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria


def record_ended(done: list[bool], ended: list[int | None], new_tokens: int, device) -> torch.Tensor:
    """Record how many new tokens each row had when it first ended (`model.generate` pads a finished row
    from then on), and return `done` as the (B,) tensor stopping criteria return."""
    for row, finished in enumerate(done):
        if finished and ended[row] is None:
            ended[row] = new_tokens
    return torch.tensor(done, dtype=torch.bool, device=device)  # (B,)


class Cancelled(StoppingCriteria):
    """Stops each row once its flag is true (its server client went away); the other rows go on."""

    def __init__(self, flags: list[Callable[[], bool]], width: int, ended: list[int | None]):
        self.flags, self.width, self.ended = flags, width, ended

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return record_ended([bool(flag()) for flag in self.flags], self.ended, input_ids.shape[1] - self.width,
                            input_ids.device)


class StopStrings(StoppingCriteria):
    """Stops each row once one of `stop` is in its answer (after column `width`). HF's `stop_strings`
    also match one that begins in the prompt ("...file" + " f" for "e f"), cutting answers short."""

    def __init__(self, visible: Callable[[list[int]], str], width: int, stop: list[str], ended: list[int | None]):
        self.visible, self.width, self.stop, self.ended = visible, width, stop, ended

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.width:].tolist():
            text = self.visible(row)
            done.append(any(s in text for s in self.stop))
        return record_ended(done, self.ended, input_ids.shape[1] - self.width, input_ids.device)


def safe_end(text: str, stop: list[str]) -> int:
    """How much of `text` can be shown now: never a stop string, nor a piece that may become one."""
    end = len(text)
    for s in stop:
        if s in text:
            end = min(end, text.index(s))
        else:  # the text may end with the start of a stop string that the next token completes
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    end = min(end, len(text) - k)
                    break
    while end > 0 and text[end - 1] == "\ufffd":  # half of a multi-byte character: wait for the rest
        end -= 1
    return end
