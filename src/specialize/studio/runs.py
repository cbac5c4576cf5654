"""What the Runs tab shows, read from the run folders themselves (never from the studio's memory).

A studio started after a run (from the CLI, or from an earlier studio that was closed) shows it
the same way: base, method and steps from `config.yaml`, losses from `metrics.jsonl`, the result
from `train_summary.json`, and a comparison from `scorecard.json` in the run or its `compare/`.
Whether a run is still being written is asked of the run's own lock (`.lock`, held by the
training process while it runs and released by the OS when the process dies).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from specialize.rundir import LOCK, RunDir
from specialize.studio.workspace import SKIPPED_DIRS, Workspace

MAX_DEPTH = 4  # runs/<group>/<name> and a little more; a workspace holding a whole disk stays quick
SCORECARD = "scorecard.json"
COMPARE_FOLDER = "compare"  # where the studio's compare of a run writes (`<run>/compare`)
METRICS_CHUNK = 1 << 20  # bytes of metrics.jsonl sent per request: a long run's file arrives in pieces


def find_runs(workspace: Workspace) -> list[RunDir]:
    """Every run folder under the workspace (a run's insides are not searched further)."""
    found = []
    for folder, dirs, _ in os.walk(workspace.root):
        here = Path(folder)
        depth = len(here.relative_to(workspace.root).parts)
        if RunDir.is_run(here):
            found.append(RunDir(here))
            dirs[:] = []
            continue
        dirs[:] = [] if depth >= MAX_DEPTH else sorted(
            d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS and not (here / d).is_symlink())
    return found


def is_running(run: RunDir) -> bool:
    """Whether a process holds the run's lock right now (probed without waiting, released at once)."""
    path = run.path / LOCK
    if not path.exists():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return True
    except OSError:  # a read-only run folder: nobody writes it
        return False
    lock.release()
    return False


def scorecard_path(run: RunDir) -> Path | None:
    for path in (run.path / COMPARE_FOLDER / SCORECARD, run.path / SCORECARD):
        if path.is_file():
            return path
    return None


def total_steps(config: dict[str, Any], rows: list[dict]) -> int | None:
    """The run's optimizer steps in all: max_steps, else epochs x steps per epoch (read off a logged row)."""
    if config.get("max_steps"):
        return int(config["max_steps"])
    for row in reversed(rows):
        if row.get("epoch") and row.get("step"):
            per_epoch = round(row["step"] / row["epoch"])
            return max(1, math.ceil(per_epoch * float(config.get("epochs") or 1)))
    return None


def summarise(run: RunDir, workspace: Workspace) -> dict[str, Any]:
    """One row of the Runs tab."""
    config, summary, rows = run.read_config(), run.read_summary(), run.read_metrics()
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    last = train_rows[-1] if train_rows else {}
    running = is_running(run)
    checkpoints = sorted((p.name for p in run.checkpoints.glob("step-*")), key=lambda n: int(n.split("-")[1])) \
        if run.checkpoints.is_dir() else []
    state = "running" if running else "finished" if summary is not None else "stopped" if checkpoints else "incomplete"
    card = scorecard_path(run)
    recommendation = None
    if card is not None:
        try:
            recommendation = (json.loads(card.read_text(encoding="utf-8")).get("recommendation") or {}).get("system")
        except (OSError, ValueError, AttributeError):
            pass
    return {
        "path": workspace.relative(run.path), "name": run.path.name, "state": state,
        "kind": "pretrain" if "size" in config and "base" not in config else "finetune",
        "base": (summary or {}).get("base") or config.get("base") or config.get("size"),
        "method": (summary or {}).get("method") or config.get("method"),
        "objective": config.get("objective"), "data": config.get("data"),
        "step": last.get("step", 0), "total_steps": (summary or {}).get("steps") or total_steps(config, train_rows),
        "loss": last.get("loss"), "eval_loss": eval_rows[-1]["eval_loss"] if eval_rows else None,
        "tokens_per_s": last.get("tokens_per_s"), "checkpoints": checkpoints,
        "seconds": (summary or {}).get("seconds") or last.get("elapsed_s"),
        "has_model": run.model.is_dir(), "scorecard": workspace.relative(card) if card else None,
        "recommendation": recommendation, "modified": _modified(run),
    }


def _modified(run: RunDir) -> float:
    times = [p.stat().st_mtime for p in (run.metrics_path, run.summary_path, run.config_path) if p.exists()]
    return max(times, default=0.0)


def read_metrics_from(run: RunDir, offset: int, file_id: str | None = None) -> dict[str, Any]:
    """Rows of metrics.jsonl from byte `offset` on, complete lines only, and where to ask from next.

    A line still being written is left for the next call. A resumed run rewrites the file (it
    drops the rows after its checkpoint, by an atomic replace), so the caller passes back the
    `file_id` it was given; when the file is another one, reading starts again at 0 and `reset`
    tells the caller to start its charts afresh.
    """
    try:
        stat = run.metrics_path.stat()
    except OSError:
        return {"rows": [], "offset": 0, "file_id": None, "reset": offset > 0}
    current = f"{stat.st_ino}-{stat.st_dev}"
    reset = offset > 0 and (file_id != current or offset > stat.st_size)
    if reset:
        offset = 0
    with open(run.metrics_path, "rb") as f:
        f.seek(offset)
        data = f.read(METRICS_CHUNK)
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return {"rows": rows, "offset": offset + end, "file_id": current, "reset": reset}
