"""A run folder: the one place that knows its layout, opens a run in it safely, and finishes it.

    runs/<name>/
      .specialize-run       marker: specialize made this folder (kind, version)
      .lock                 held while a process writes the run; the OS releases it if the process dies
      config.yaml           the resolved config, exactly what ran
      tokenizer/            pretrain only: the locally trained tokenizer (reused by --resume)
      data/                 pretrain only: the corpus tokenised into memory-mapped token files
      metrics.jsonl         one JSON object per logged step / eval
      checkpoints/step-N/   atomic checkpoints (checkpoint.py)
      model/                HF folder (safetensors) with tokenizer + chat template, or a LoRA adapter
      train_summary.json    written last: the run is complete

`pretrain` and `finetune` open a run with `RunDir.start` and end it with `RunDir.finish`, and
every verb that takes a run reads it through `RunDir.find` / `RunDir.read_*`.

Writing is guarded, because `--out` is typed by hand: a run writes only into a new or empty
folder or a folder specialize made, never into one holding other files (a fresh run removes the
previous run's outputs, which must not be somebody's data); never where its own input lives;
and never while another process writes the same run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from specialize.config import StageConfig, save_config
from specialize.errors import UserError
from specialize.files import append_jsonl, write_dir_atomic, write_json, write_jsonl
from specialize.tracking import RUN_FILES

MARKER = ".specialize-run"
LOCK = ".lock"
CONFIG = "config.yaml"
MODEL = "model"
TOKENIZER = "tokenizer"
DATA = "data"  # pretrain only: the corpus as token files (shards.py)
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SUMMARY = "train_summary.json"
REFERENCE = "reference_logps.safetensors"  # preference objectives, full training: the reference's log-probs
# what a fresh run replaces: its own files, and the experiment trackers' (tracking.py)
OUTPUTS = (CONFIG, TOKENIZER, DATA, METRICS, CHECKPOINTS, MODEL, SUMMARY, REFERENCE, *RUN_FILES)

# Locks this process holds, by run folder: held until `finish` or exit, not until a RunDir object
# happens to be garbage-collected (a FileLock releases itself when it is).
_HELD: dict[Path, FileLock] = {}


class RunDir(os.PathLike):
    """A run folder. It also behaves as its path: `Path(run)`, `run / "model"`, `run.exists()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names RunDir lacks: the path's own (`parent`, `exists`, `is_dir`, ...).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.path, name)

    # -- layout ---------------------------------------------------------------------------------
    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RunDir, Path)):
            return self.path == Path(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    # -- reading --------------------------------------------------------------------------------
    @classmethod
    def find(cls, ref: str | os.PathLike | None) -> RunDir | None:
        """The run `ref` names (a folder with `model/` and `config.yaml`), or None: a plain
        model folder or a hub id."""
        if ref is None or ref == "":
            return None
        path = Path(ref)
        if (path / MODEL).is_dir() and (path / CONFIG).is_file():
            return cls(path)
        return None

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """Whether specialize made this folder: its marker, or (runs from before the marker) a
        resolved config.yaml beside a run's outputs."""
        path = Path(path)
        if (path / MARKER).is_file():
            return True
        if not (path / CONFIG).is_file() or not any((path / n).exists() for n in (MODEL, CHECKPOINTS, SUMMARY)):
            return False
        try:
            config = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return False
        return isinstance(config, dict) and "out" in config and ("base" in config or "size" in config)

    def read_config(self) -> dict[str, Any]:
        """The resolved config.yaml ({} when missing or not a mapping)."""
        try:
            loaded = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def read_summary(self) -> dict[str, Any] | None:
        """train_summary.json, or None while the run is unfinished (or was never one)."""
        try:
            loaded = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl (a row being written right now is skipped)."""
        return _read_rows(self.metrics_path)

    # -- writing --------------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: StageConfig, *, kind: str = "run", inputs: Iterable[str | os.PathLike | None] = (),
              main: bool = True) -> RunDir:
        """Claim `cfg.out` for a run, before any slow work: refuse a folder that is not ours or
        that holds this run's inputs, and lock it against a second process. Nothing is removed
        yet (`begin` does that once the data and model have loaded), so a run that fails on
        bad input leaves the previous run intact.

        Only the main process (`main`) touches the folder; the others just get the object.
        """
        run = cls(cfg.out)
        if not main:
            return run
        path = run.path
        if path.exists() and not path.is_dir():
            raise UserError("--out is a file, not a folder", path=path)
        resume = bool(getattr(cfg, "resume", False))
        if path.is_dir() and not cls.is_run(path):
            others = sorted(p.name for p in path.iterdir() if p.name != LOCK)
            if others:
                shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
                raise UserError(f"--out holds files specialize did not write ({shown}); a run writes only into a "
                                "new or empty folder or an earlier run's folder, so give another --out", path=path)
        if resume and not cls.is_run(path):  # a typo in --out must not silently train from scratch
            raise UserError("--resume: this folder holds no run to continue", path=path)
        path.mkdir(parents=True, exist_ok=True)
        run._acquire_lock()
        try:
            run._check_inputs(inputs, resume)
            # Ours from now on: whatever this run writes before `begin` (pretrain's tokenizer and
            # token shards) must not make the folder look foreign to a retry.
            if not (path / MARKER).is_file():
                write_json(path / MARKER, {"kind": kind, "format": 1})
        except BaseException:
            run.release()
            raise
        return run

    def begin(self, cfg: StageConfig, *, kind: str, main: bool = True, keep: Iterable[str] = (), say=print) -> None:
        """Start writing: unless resuming, remove the previous run's outputs (a stale model/ or
        checkpoint must never pass for this run's), but those named in `keep` that this run
        already wrote; then write the marker and config.yaml."""
        if not main:
            return
        if not getattr(cfg, "resume", False):
            existing = [name for name in OUTPUTS if (self.path / name).exists() and name not in keep]
            if existing:
                say(f"starting afresh in {self.path}: the earlier run's {', '.join(existing)} "
                    f"{'is' if len(existing) == 1 else 'are'} replaced (--resume continues a run instead)")
            for name in existing:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        write_json(self.path / MARKER, {"kind": kind, "format": 1})
        save_config(cfg, self.config_path)

    def _acquire_lock(self) -> None:
        key = self.path.resolve()
        if key in _HELD:  # this process already writes this run (a second start in one process)
            return
        lock = FileLock(str(self.path / LOCK))
        try:
            lock.acquire(blocking=False)
        except Timeout:
            raise UserError("another specialize process is writing this run right now; wait for it to end or "
                            "give another --out", path=self.path) from None
        _HELD[key] = lock

    def _check_inputs(self, inputs: Iterable[str | os.PathLike | None], resume: bool) -> None:
        """Refuse inputs that live where this run writes: a fresh run would delete them."""
        touched = [self.path / name for name in (OUTPUTS if not resume else (CONFIG, METRICS, SUMMARY, MODEL))]
        for given in inputs:
            if not given or not Path(given).exists():
                continue  # hub ids and dataset names
            source = Path(given).resolve()
            for target in touched:
                target = target.resolve()
                if source == target or target in source.parents:
                    raise UserError(f"the input {given} is inside this run's {target.name}, which the run "
                                    "replaces; keep inputs outside the run folder or give another --out",
                                    path=self.path)

    def finish(self, model, tokenizer, summary: dict[str, Any], *, state_dict: dict | None = None) -> None:
        """Write model/ (safetensors, atomically), then train_summary.json, then release the lock.

        `state_dict`: the gathered full weights under FSDP/DeepSpeed, where the module holds shards.
        """
        save_pretrained(model, tokenizer, self.model, state_dict=state_dict)
        write_json(self.summary_path, summary)
        self.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()  # also when the run failed: another process may try again at once

    def release(self) -> None:
        """Let other processes write this run again (also done by the OS when this process ends)."""
        lock = _HELD.pop(self.path.resolve(), None)
        if lock is not None:
            lock.release()


class MetricsLog:
    """A run's metrics.jsonl: one JSON object per logged step or eval (written by the main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, row)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a killed run logged steps its last checkpoint lacks)."""
        if self.enabled and self.path.is_file():
            rows = _read_rows(self.path)
            write_jsonl(self.path, [row for row in rows if row.get("step", 0) <= step])


def save_pretrained(model, tokenizer, folder: str | os.PathLike, *, state_dict: dict | None = None) -> None:
    """A model folder (safetensors weights + tokenizer), written atomically: a crash leaves no
    folder that looks complete. LoRA models write their adapter and a pointer to the base.

    `state_dict`: the gathered full weights under FSDP/DeepSpeed, where the module holds shards.
    """
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    write_dir_atomic(folder, fill)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # the last line of a run that is still writing it
    return rows
