"""The one thread that owns the model: a bounded queue of jobs feeding one running batch.

Requests wait in a bounded queue. Between two decode steps the worker moves as many waiting
jobs as the batch has room for (`max_batch_size`) into the running batch (continuous batching,
see `decode.py`): streamed or not, any sampling settings, and a row leaves the batch as soon as
its answer ends, so a short answer never waits for a long one. A job whose client goes away is
dropped from the queue, or leaves the batch at the next token if it already runs. A full queue
raises `QueueFull` at once (the server answers 503) rather than letting latency grow without
bound. Models whose KV cache cannot be shared by rows (sliding-window, recurrent) answer one
job at a time instead.

If a failed step leaves the device unusable (a CUDA device-side assert poisons the whole
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
from specialize.serve.decode import AdmitFailed, RunningBatch, supports


class Sampling(NamedTuple):
    """How a job is sampled (each row of the running batch has its own)."""

    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    @classmethod
    def of(cls, temperature: float | None, top_p: float | None, stop: list[str], seed: int | None) -> Sampling:
        """Normalised: greedy ignores top_p and seed."""
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
    constraint: object | None = None  # constrained.Constraint: the grammar the answer must follow
    top_logprobs: int | None = None  # None: no logprobs; k: each token's log-probability and the k likeliest
    on_logprobs: Callable[[list], None] | None = None  # streaming: the logprobs of the next piece, just before it
    end_after: str | None = None  # the answer ends once it holds this text (kept): a single tool call
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
        self._batched = supports(generator.model)
        self._thread = threading.Thread(target=self._run, name="specialize-serve-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def batched(self) -> bool:
        """Whether jobs run in the running batch, which alone enforces grammars and reports logprobs."""
        return self._batched

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
        """Cancel waiting jobs and stop the thread once the running rows are done."""
        with self._lock:
            self._closed = True
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()
            self._lock.notify_all()
        self._thread.join(timeout=30)

    def _take(self, room: int, wait: bool) -> list[Job] | None:
        """Up to `room` waiting jobs, oldest first, marked running; waits for one only if `wait`.

        None once the worker is closed and nothing runs (`wait`).
        """
        with self._lock:
            while wait and not self._pending and not self._closed:
                self._lock.wait()
            if self._closed and wait:
                return None
            jobs: list[Job] = []
            while self._pending and len(jobs) < room:
                job = self._pending.popleft()
                if job.future.set_running_or_notify_cancel():  # False: its client gave up
                    jobs.append(job)
            return jobs

    def _run(self) -> None:
        try:
            if self._batched:
                self._run_batched(RunningBatch(self.generator))
            else:
                while (jobs := self._take(1, wait=True)) is not None and (not jobs or self._alone(jobs[0])):
                    pass
        except BaseException as e:  # a bug in the worker itself: fail loudly rather than hang every request
            self._fail(f"the worker thread died: {type(e).__name__}: {e}")
            raise

    def _run_batched(self, batch: RunningBatch) -> None:
        """Admit waiting jobs at each token boundary, advance every row by one token, hand out ended answers."""
        while (jobs := self._take(self.max_batch_size - len(batch), wait=not batch)) is not None:
            try:
                try:
                    ended = batch.admit(jobs) if jobs else []
                except AdmitFailed as failed:  # only the new requests fail; the running rows go on
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(failed.__cause__ or failed)
                    ended, jobs = [], []
                    if not device_usable(self.generator.device):
                        raise failed.__cause__ or failed  # a broken device: handled below, as for a step
                if batch:
                    ended += batch.step()
            except Exception as e:  # the request handlers re-raise it; the middleware logs the traceback
                for job in jobs + [row.job for row in batch.rows]:
                    if not job.future.done():
                        job.future.set_exception(e)
                batch.clear()
                if not device_usable(self.generator.device):
                    self._fail(f"the {self.generator.device} device is unusable after {type(e).__name__}: {e}")
                    return
                continue
            for job, completion in ended:
                job.future.set_result(completion)

    def _alone(self, job: Job) -> bool:
        """Answer one job by itself (models whose cache rows cannot be merged); False once the device broke."""
        s = job.sampling
        try:
            job.future.set_result(self.generator.stream_ids(
                job.prompt_ids, max_new_tokens=job.max_tokens, temperature=s.temperature, top_p=s.top_p,
                stop=list(s.stop), seed=s.seed, on_text=job.on_text, cancelled=job.cancelled.is_set))
        except Exception as e:
            job.future.set_exception(e)
            if not device_usable(self.generator.device):
                self._fail(f"the {self.generator.device} device is unusable after {type(e).__name__}: {e}")
                return False
        return True

    def _fail(self, reason: str) -> None:
        """Stop taking jobs: waiting ones fail now, later ones are refused by `submit`."""
        with self._lock:
            self.failure = reason
            for job in self._pending:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(WorkerFailed(reason))
            self._pending.clear()
