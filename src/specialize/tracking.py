"""Experiment trackers (`--report-to tensorboard,wandb,mlflow,trackio`) through accelerate's trackers.

Every logged metrics row goes to the chosen trackers under stable names (`train/loss`,
`eval/loss`, ...), and the resolved config is stored with the run. Nothing leaves the machine
unless the user configured it, and the files land in the run folder:

    runs/<name>/tensorboard/<project>/   TensorBoard event files (`tensorboard --logdir runs/<name>/tensorboard`)
    runs/<name>/wandb/offline-run-*/     wandb, offline unless WANDB_MODE is set (`wandb sync` uploads it later)
    runs/<name>/mlflow.db                mlflow's local store (SQLite), unless MLFLOW_TRACKING_URI is set
    trackio                              trackio's own local store ($TRACKIO_DIR, default under HF_HOME)

Trackio reads its folder once, when it is imported, so it cannot follow a per-run folder; its
local store is what `trackio show` reads anyway.

Used as: `Accelerator(**accelerator_kwargs(cfg.report_to, out))`, then `with Trackers(accelerator,
cfg, out, project) as trackers:` around the loop, `trackers.log(row, step)` for every metrics row.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from specialize.errors import UserError

TENSORBOARD_DIR = "tensorboard"  # in the run folder; accelerate adds /<project>
WANDB_DIR = "wandb"  # wandb itself creates <run>/wandb/offline-run-*/
MLFLOW_DB = "mlflow.db"  # mlflow's local store (SQLite: its file store is in maintenance mode and refuses to start)
MLFLOW_ARTIFACTS = "mlflow-artifacts"
RUN_FILES = (TENSORBOARD_DIR, WANDB_DIR, MLFLOW_DB, MLFLOW_ARTIFACTS)  # what a fresh run replaces in its folder

# tracker → (modules it needs, what to pip install)
PACKAGES = {"tensorboard": (("tensorboard",), "tensorboard"), "wandb": (("wandb",), "wandb"),
            # mlflow-skinny lacks what its SQLite store needs; the full mlflow package brings it
            "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"), "trackio": (("trackio",), "trackio")}

# metrics.jsonl keys → tracker names; other numeric keys keep their name under train/ (eval_x: eval/x).
NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
         "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss", "eval_ppl": "eval/perplexity"}


def accelerator_kwargs(report_to: Iterable[str], run_dir: Path | None) -> dict:
    """Keyword arguments for `accelerate.Accelerator` that log to `report_to` in `run_dir`.

    Empty `report_to`: `{}`, and no tracker package is imported. Raises `UserError` when a
    tracker's package is missing: accelerate would drop that tracker with only a debug message.
    """
    names = list(dict.fromkeys(report_to))
    if not names:
        return {}
    if run_dir is None:
        raise ValueError(f"trackers {names} need the run folder to write into")
    for name in names:
        if name not in PACKAGES:
            raise UserError(f"unknown tracker {name!r} (use {', '.join(PACKAGES)})", field="report_to")
        modules, package = PACKAGES[name]
        if any(importlib.util.find_spec(m) is None for m in modules):
            raise UserError(f"--report-to {name} needs the {package} package: pip install {package}",
                            field="report_to")
    if "mlflow" in names:
        # mlflow starts its usage telemetry (config.mlflow-telemetry.io) when it is imported, which
        # init_trackers does next; the user's own setting of the variable wins.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from accelerate.utils import ProjectConfiguration

    run_dir = Path(run_dir)
    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=str(run_dir),
                                                   logging_dir=str(run_dir / TENSORBOARD_DIR))}


def flat_config(config: Any) -> dict[str, Any]:
    """A config (pydantic model or mapping) as one level of `a.b` keys with bool/int/float/str/None values.

    TensorBoard's hparams and mlflow's params take only scalars; lists become their JSON text.
    """
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        elif isinstance(value, os.PathLike):
            flat[prefix] = os.fspath(value)
        else:
            flat[prefix] = json.dumps(value, default=str)

    walk("", config)
    return flat


def tracker_values(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics.jsonl row under tracker names (`step` is the x axis, not a value)."""
    values = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # None (no grad norm under DeepSpeed), strings, flags
        if key in NAMES:
            name = NAMES[key]
        elif "/" in key:
            name = key  # already namespaced by its objective
        elif key.startswith("eval_"):
            name = "eval/" + key.removeprefix("eval_")
        else:
            name = "train/" + key
        values[name] = float(value)
    return values


class Trackers:
    """The run's trackers: started with the resolved config, fed metrics rows, finished once.

    Does nothing when `cfg.report_to` is empty, and logs only on the main process (accelerate).
    `cfg` is the resolved stage config (a pydantic model or a mapping with `report_to`).
    """

    def __init__(self, accelerator, cfg: Any, run_dir: Path, project: str = "specialize"):
        self.accelerator = accelerator
        self.names = list(_report_to(cfg))
        self.active = bool(self.names)
        if not self.active:
            return
        missing = [n for n in self.names if n not in {str(t) for t in accelerator.log_with}]
        if missing:  # an Accelerator made without accelerator_kwargs(...): nothing would be logged
            raise ValueError(f"the Accelerator was not made to log with {missing}: "
                             f"pass accelerator_kwargs(report_to, run_dir) to Accelerator(...)")
        run_dir = Path(run_dir)
        self.our_mlflow_store = False
        init: dict[str, dict] = {}
        if "wandb" in self.names:
            # Passed explicitly, not left to wandb: it reads its variables once per process.
            init["wandb"] = {"name": run_dir.name, "mode": os.environ.get("WANDB_MODE") or "offline",
                             "dir": os.environ.get("WANDB_DIR") or str(run_dir)}
        if "mlflow" in self.names:
            init["mlflow"] = {"run_name": run_dir.name}
            if "MLFLOW_TRACKING_URI" not in os.environ and accelerator.is_main_process:
                import mlflow

                # Process-wide in mlflow (it exports MLFLOW_TRACKING_URI too): undone in finish(), or
                # the next run in this process would log into this run's store.
                mlflow.set_tracking_uri(f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}")
                self.our_mlflow_store = True
                # Else the experiment's artifacts would go to ./mlartifacts, wherever the user stands.
                init["mlflow"]["logging_dir"] = str((run_dir / MLFLOW_ARTIFACTS).resolve())
        if "trackio" in self.names:
            init["trackio"] = {"name": run_dir.name, "embed": False}  # embed: a notebook dashboard
        accelerator.init_trackers(project, config=flat_config(cfg), init_kwargs=init)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        """Log one metrics.jsonl row (a training step or an eval) at optimizer step `step`."""
        if self.active:
            values = tracker_values(row)
            if values:
                self.accelerator.log(values, step=step)

    def __enter__(self) -> Trackers:  # noqa: PYI034 (typing.Self is Python 3.11+; we support 3.10)
        return self

    def __exit__(self, *exc) -> None:
        self.finish()  # also when training stops early (a stop signal, an error): the files stay readable

    def finish(self) -> None:
        """Close every tracker, writing out its files.

        Not `accelerator.end_training()`: that also destroys the process group, which the caller
        still needs after training (gathering sharded weights, saving on the main process).
        """
        if self.active:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
            self.active = False
            if self.our_mlflow_store:
                import mlflow

                mlflow.set_tracking_uri(None)


def _report_to(cfg: Any) -> list[str]:
    names = cfg.get("report_to") if isinstance(cfg, Mapping) else getattr(cfg, "report_to", None)
    return list(names or [])
