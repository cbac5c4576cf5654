"""The one thread that owns the model: a bounded queue of jobs, drained in batches.

Requests wait in a bounded queue; waiting requests with equal sampling settings are answered
together by one `Generator.generate_ids` call. A stream runs alone through
`Generator.stream_ids`, which stops as soon as its client goes away. A full queue raises
`QueueFull` at once (the server answers 503) rather than letting latency grow without bound.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

from specialize.generate import Generator


class Sampling(NamedTuple):
    """How a job is sampled; jobs with equal `Sampling` may share a batch."""

    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    @classmethod
    def of(cls, temperature: float | None, top_p: float | None, stop: list[str], seed: int | None) -> "Sampling":
        """Normalised so that equal means batchable: greedy ignores top_p and seed, so all greedy jobs match."""
        if not temperature:
            return cls(0.0, 1.0, tuple(stop), None)
        return cls(temperature, top_p or 1.0, tuple(stop), seed)


@dataclass
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


class Worker:
    """The one thread that touches the model, draining a bounded queue of jobs in batches."""

    def __init__(self, generator: Generator, max_batch_size: int, max_queue: int):
        self.generator, self.max_batch_size, self.max_queue = generator, max_batch_size, max_queue
        self._pending: deque[Job] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="specialize-serve-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future gets the `Completion` (or the exception). Raises QueueFull."""
        with self._lock:
            if self._closed or len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._lock.notify()
        return job.future

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
        """The oldest job plus waiting jobs with the same settings (streams and seeded sampling alone)."""
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
            for job in [j for j in self._pending if j.on_text is None and j.sampling == first.sampling]:
                if len(batch) >= self.max_batch_size:
                    break
                self._pending.remove(job)
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
            return batch

    def _answer(self, batch: list[Job]) -> list:
        s = batch[0].sampling
        if batch[0].on_text is not None:
            job = batch[0]
            return [self.generator.stream_ids(job.prompt_ids, max_new_tokens=job.max_tokens,
                                              temperature=s.temperature, top_p=s.top_p, stop=list(s.stop),
                                              seed=s.seed, on_text=job.on_text, cancelled=job.cancelled.is_set)]
        return self.generator.generate_ids([j.prompt_ids for j in batch], max_new_tokens=[j.max_tokens for j in batch],
                                           temperature=s.temperature, top_p=s.top_p, stop=list(s.stop), seed=s.seed)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                for job, result in zip(batch, self._answer(batch)):
                    job.future.set_result(result)
            except Exception as e:  # the request handlers re-raise it; the middleware logs the traceback
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
