"""Stopping on a signal without losing work: SIGTERM or Ctrl-C ends training at a step boundary.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM some seconds before they kill a job.
While `StopSignals` is active, SIGTERM and SIGINT only set a flag; the loop checks it after each
optimizer step, writes a checkpoint there and stops (`errors.Stopped`), so `--resume` continues
exactly where it stopped. A second Ctrl-C interrupts at once, for a user who wants out now.

Under torchrun every process must stop at the same step (a process that stops early would leave
the others waiting in a collective forever), so the flag is agreed on with an all-reduce (max)
each step: if any process was signalled, all of them stop after that step.
"""

from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT request a stop instead of killing the process."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: out now
        self.received = signum

    def agreed(self, accelerator) -> int | None:
        """The signal any process received (the same answer on every process), or None."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor(self.received or 0, device=accelerator.device)
        flag = int(accelerator.reduce(flag, reduction="max"))
        return flag or None
