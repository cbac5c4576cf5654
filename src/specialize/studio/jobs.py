"""The studio's job queue: `specialize finetune|compare|export` as child processes, a few at a time.

Each job is `[sys.executable, "-m", "specialize", VERB, *flags]` (never a shell), run with the
workspace as its working directory and its stdout and stderr in `.studio/logs/<id>.log`. A
crashing run is a failed job, never a crashed studio. At most `slots` jobs run at once (CPU
training jobs that share the cores are all slower than one after the other); the others wait in
order. Stopping a running job sends SIGTERM: the training loop writes a checkpoint at the next
step boundary and exits with 143, and resuming is the same command with `--resume`.

Logs live outside the run folder because `finetune` refuses an `--out` that holds files it did
not write; the run's own files (metrics.jsonl, train_summary.json) are what the Runs tab reads.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from specialize.studio.workspace import HIDDEN

STOPPED_CODE = 128 + signal.SIGTERM  # the loop's exit code after a SIGTERM stop (errors.Stopped)
LOG_TAIL_BYTES = 16_384


@dataclass
class Job:
    """One child process: what it runs, where it logs, and how far it got."""

    id: str
    kind: str  # finetune | compare | export
    args: list[str]  # flags after the verb
    target: str | None  # the workspace-relative folder it writes (run, compare or export folder)
    log: Path
    state: str = "queued"  # queued | running | done | failed | stopped | cancelled
    returncode: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    stop_requested: bool = False

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "specialize", self.kind, *self.args]

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "args": self.args, "target": self.target, "state": self.state,
                "returncode": self.returncode, "created": self.created, "started": self.started,
                "ended": self.ended, "command": " ".join(["specialize", self.kind, *map(_quote, self.args)])}

    def log_tail(self, limit: int = LOG_TAIL_BYTES) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


class JobQueue:
    """Runs jobs in submission order, at most `slots` at once; thread-safe."""

    def __init__(self, workspace: Path, slots: int = 1):
        self.workspace, self.slots = Path(workspace), max(1, slots)
        self.logs = self.workspace / HIDDEN / "logs"
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._prefix = time.strftime("%Y%m%d-%H%M%S")
        self._closed = False

    def submit(self, kind: str, args: list[str], target: str | None = None) -> Job:
        with self._lock:
            if self._closed:
                raise RuntimeError("the studio is shutting down")
            job_id = f"{self._prefix}-{next(self._ids)}"
            job = Job(job_id, kind, list(args), target, self.logs / f"{job_id}-{kind}.log")
            self.jobs[job_id] = job
            self._pump()
        return job

    def busy(self, target: str) -> Job | None:
        """The queued or running job that writes `target`, if any."""
        with self._lock:
            return next((j for j in self.jobs.values() if j.target == target and j.state in ("queued", "running")),
                        None)

    def stop(self, job_id: str) -> Job:
        """Queued: cancel it. Running: SIGTERM (a training run checkpoints and exits 143)."""
        with self._lock:
            job = self.jobs[job_id]
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
            elif job.state == "running" and job.process is not None:
                job.stop_requested = True
                job.process.send_signal(signal.SIGTERM)
            return job

    def list(self) -> list[dict]:
        with self._lock:
            return [j.to_json() for j in sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)]

    def _pump(self) -> None:
        """Start queued jobs while slots are free (called with the lock held)."""
        running = sum(j.state == "running" for j in self.jobs.values())
        for job in sorted(self.jobs.values(), key=lambda j: j.created):
            if running >= self.slots:
                break
            if job.state == "queued":
                self._start(job)
                running += 1

    def _start(self, job: Job) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(job.log, "ab") as log:
            log.write(f"$ {job.to_json()['command']}\n".encode())
            log.flush()
            try:
                # Own session: Ctrl-C in the studio's terminal does not reach the run, which may
                # outlive the studio (a restarted studio finds it by its run folder).
                job.process = subprocess.Popen(job.argv, cwd=self.workspace, stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            except OSError as e:
                log.write(f"could not start: {e}\n".encode())
                job.state, job.ended = "failed", time.time()
                return
        job.state, job.started = "running", time.time()
        threading.Thread(target=self._wait, args=(job,), name=f"studio-job-{job.id}", daemon=True).start()

    def _wait(self, job: Job) -> None:
        code = job.process.wait()
        with self._lock:
            job.returncode, job.ended = code, time.time()
            if code == 0:
                job.state = "done"
            elif job.stop_requested and code in (STOPPED_CODE, -signal.SIGTERM):
                job.state = "stopped"
            else:
                job.state = "failed"
            self._pump()

    def close(self, stop_running: bool = False, timeout: float = 60.0) -> list[Job]:
        """No new jobs; queued ones are cancelled. Running ones keep going unless `stop_running`
        (SIGTERM, then wait up to `timeout` s, then SIGKILL). Returns the jobs still running."""
        with self._lock:
            self._closed = True
            for job in self.jobs.values():
                if job.state == "queued":
                    job.state = "cancelled"
            running = [j for j in self.jobs.values() if j.state == "running"]
        if stop_running:
            for job in running:
                self.stop(job.id)
            deadline = time.monotonic() + timeout
            for job in running:
                try:
                    job.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    job.process.kill()
                    job.process.wait()
            return []
        return running
