"""The one thread that owns the model: a bounded queue of jobs, drained in batches.

Requests wait in a bounded queue; waiting requests with equal sampling settings are answered
together by one `Generator.generate_ids` call, as long as the batch still fits the context
window: a batch is as wide as its longest prompt and runs to its largest budget, so two jobs
that fit alone may not fit together (the later one then waits for the next batch). A stream
runs alone through `Generator.stream_ids`. A job whose client goes away is dropped from the
queue, or stops generating if it already runs. A full queue raises `QueueFull` at once (the
server answers 503) rather than letting latency grow without bound.

If a failed batch leaves the device unusable (a CUDA device-side assert poisons the whole
context: every later call fails), the worker stops taking jobs and `failure` says why, so that
/health fails and a supervisor restarts the server.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from specialize.generate import Generator, is_greedy


class Sampling(NamedTuple):
    """How a job is sampled; jobs with equal `Sampling` may share a batch."""

    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    @classmethod
    def of(cls, temperature: float | None, top_p: float | None, stop: list[str], seed: int | None) -> "Sampling":
        """Normalised so that equal means batchable: greedy ignores top_p and seed, so all greedy jobs match."""
        if is_greedy(temperature):
            return cls(0.0, 1.0, tuple(stop), None)
        return cls(temperature, top_p or 1.0, tuple(stop), seed)


@dataclass(eq=False)  # a job is itself, not its fields: the queue removes this one
class Job:
    """One request waiting for the model."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    on_text: Callable[[str], None] | None = None  # streaming: gets each piece of text, in the worker thread
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(Exception):
    pass


class WorkerFailed(Exception):
    """The worker can no longer answer (see `Worker.failure`); the server needs a restart."""


def device_usable(device: torch.device) -> bool:
    """Whether `device` still runs work. After a CUDA device-side assert every call fails."""
    try:
        torch.ones(1, device=device).add_(1).cpu()  # .cpu() waits for the device: errors surface here
        return True
    except Exception:  # torch.AcceleratorError (a RuntimeError) on a poisoned CUDA context
        return False


class Worker:
    """The one thread that touches the model, draining a bounded queue of jobs in batches."""

    def __init__(self, generator: Generator, max_batch_size: int, max_queue: int):
        self.generator, self.max_batch_size, self.max_queue = generator, max_batch_size, max_queue
        self._pending: deque[Job] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self.failure: str | None = None  # why the worker stopped answering; None while it is healthy
        self.dropped = 0  # jobs whose client went away while they waited: never generated
        self._thread = threading.Thread(target=self._run, name="specialize-serve-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future gets the `Completion` (or the exception). Raises QueueFull, WorkerFailed."""
        with self._lock:
            if self.failure is not None:
                raise WorkerFailed(self.failure)
            if self._closed or len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._lock.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """The job's client went away: drop it if it still waits (freeing its slot), else stop its rows."""
        job.cancelled.set()  # a running job checks this after every token
        with self._lock:
            if job.future.cancel():  # False: already running or done
                if job in self._pending:
                    self._pending.remove(job)
                self.dropped += 1

    def close(self) -> None:
        """Cancel waiting jobs and stop the thread once the running batch is done."""
        with self._lock:
            self._closed = True
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()
            self._lock.notify_all()
        self._thread.join(timeout=30)

    def _take(self) -> list[Job] | None:
        """The oldest job plus waiting jobs with the same settings (streams and seeded sampling alone).

        A job joins only if the batch, as wide as its longest prompt and run to its largest
        budget, still fits the context window; otherwise it waits for a later batch.
        """
        with self._lock:
            while True:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return None
                first = self._pending.popleft()
                if first.future.set_running_or_notify_cancel():  # False: its client gave up
                    break
            batch = [first]
            if first.on_text is not None or first.sampling.seed is not None:
                return batch  # a stream, or seeded sampling that must not depend on its neighbours
            context = self.generator.context_length
            width, budget = len(first.prompt_ids), first.max_tokens
            for job in [j for j in self._pending if j.on_text is None and j.sampling == first.sampling]:
                if len(batch) >= self.max_batch_size:
                    break
                wider, longer = max(width, len(job.prompt_ids)), max(budget, job.max_tokens)
                if context is not None and wider + longer > context:
                    continue  # fits alone (the server checked) but not with these neighbours
                self._pending.remove(job)
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
                    width, budget = wider, longer
            return batch

    def _answer(self, batch: list[Job]) -> list:
        s = batch[0].sampling
        if batch[0].on_text is not None:
            job = batch[0]
            return [self.generator.stream_ids(job.prompt_ids, max_new_tokens=job.max_tokens,
                                              temperature=s.temperature, top_p=s.top_p, stop=list(s.stop),
                                              seed=s.seed, on_text=job.on_text, cancelled=job.cancelled.is_set)]
        return self.generator.generate_ids([j.prompt_ids for j in batch], max_new_tokens=[j.max_tokens for j in batch],
                                           temperature=s.temperature, top_p=s.top_p, stop=list(s.stop), seed=s.seed,
                                           cancelled=[j.cancelled.is_set for j in batch])

    def _run(self) -> None:
        try:
            while (batch := self._take()) is not None:
                try:
                    for job, result in zip(batch, self._answer(batch)):
                        job.future.set_result(result)
                except Exception as e:  # the request handlers re-raise it; the middleware logs the traceback
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(e)
                    if not device_usable(self.generator.device):
                        self._fail(f"the {self.generator.device} device is unusable after {type(e).__name__}: {e}")
                        return
        except BaseException as e:  # a bug in the worker itself: fail loudly rather than hang every request
            self._fail(f"the worker thread died: {type(e).__name__}: {e}")
            raise

    def _fail(self, reason: str) -> None:
        """Stop taking jobs: waiting ones fail now, later ones are refused by `submit`."""
        with self._lock:
            self.failure = reason
            for job in self._pending:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(WorkerFailed(reason))
            self._pending.clear()
