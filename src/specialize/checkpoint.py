"""Atomic checkpoints with everything an exact resume needs, and no pickle anywhere.

`checkpoints/step-N/` holds:
- `trainable.safetensors`   the trainable parameters (all weights, or only LoRA's)
- `optimizer.safetensors` + `optimizer.json`   optimizer tensors, and its scalars/param groups
- `scheduler.json`          learning-rate scheduler state
- `rng-<rank>.safetensors` + `rng-<rank>.json`   torch / numpy / python RNG states per process
- `trainer_state.json`      step, tokens seen, elapsed time, data fingerprint

It is written into `.step-N.tmp/` and renamed into place in one `os.replace`, so a kill at any
moment leaves either a complete checkpoint or a temporary folder that is never picked. A write
that fails (a full disk) removes the temporary folder and is one `UserError` line; the earlier
checkpoints are untouched, so `--resume` continues from the newest of them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specialize.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
TEMP_DIR = re.compile(r"^\.step-(\d+)\.tmp$")
OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O error
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, then its data forced to disk: the rename that completes a checkpoint
    must never reach the disk before the tensors it points to (a power loss would leave a
    checkpoint that looks complete and holds truncated files)."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:  # "I/O error: No space left on device (os error 28)": an OSError in disguise
        found = OS_ERROR.search(str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e
    _fsync_file(path)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def trainable_state(model) -> dict[str, torch.Tensor]:
    # named_parameters() lists tied weights once, which safetensors requires.
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, folder: Path) -> None:
    tensors = load_file(folder / "optimizer.safetensors")
    meta = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _on_mps() -> bool:
    return not torch.cuda.is_available() and torch.backends.mps.is_available()


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    if _on_mps():  # dropout on an Apple GPU draws from its own generator
        tensors["mps"] = torch.mps.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "python": [py_version, list(py_state), py_gauss]}
    return tensors, meta


def set_rng_state(folder: Path, rank: int) -> None:
    tensors = load_file(folder / f"rng-{rank}.safetensors")
    meta = json.loads((folder / f"rng-{rank}.json").read_text(encoding="utf-8"))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    if "mps" in tensors and _on_mps():
        torch.mps.set_rng_state(tensors["mps"])
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def temp_dir(root: Path, step: int) -> Path:
    return root / f".step-{step}.tmp"


@contextmanager
def _writing(tmp: Path) -> Iterator[None]:
    """Turn a failed write into `tmp` into one clear line, leaving no temporary folder behind.

    Raises:
        UserError: naming the checkpoint that was not written, why (the disk is full, ...), and
            the newest complete checkpoint, which is untouched.
    """
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        root, step = tmp.parent, TEMP_DIR.match(tmp.name).group(1)
        why = "the disk is full" if e.errno in DISK_FULL else (e.strerror or str(e))
        kept = latest(root)
        after = (f"the earlier checkpoint {kept.name} is intact (resume from it with --resume)" if kept
                 else "there is no earlier checkpoint")
        raise UserError(f"checkpoint step-{step} was not written: {why}; {after}", path=root) from None


def begin(root: Path, step: int) -> Path:
    """Create an empty temporary folder for checkpoint `step` (main process only)."""
    tmp = temp_dir(root, step)
    with _writing(tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def write_rank_files(tmp: Path, rank: int) -> None:
    """Every process writes its own RNG state into the temporary folder."""
    tensors, meta = rng_state()
    with _writing(tmp):
        _save_tensors(tensors, tmp / f"rng-{rank}.safetensors")
        _write_json(tmp / f"rng-{rank}.json", meta)


def write_main_files(tmp: Path, model, optimizer, scheduler, trainer_state: dict[str, Any]) -> None:
    with _writing(tmp):
        _save_tensors(trainable_state(model), tmp / "trainable.safetensors")
        tensors, meta = optimizer_state(optimizer)
        _save_tensors(tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "optimizer.json", meta)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "trainer_state.json", trainer_state)


def commit(root: Path, step: int, keep: int) -> Path:
    """Rename the finished temporary folder into place, then prune old checkpoints."""
    tmp = temp_dir(root, step)
    final = root / f"step-{step}"
    with _writing(tmp):
        if final.exists():
            shutil.rmtree(final)
        _fsync_dir(tmp)
        os.replace(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders never match `step-N`."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load(folder: Path, model, optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; return the trainer state."""
    weights = load_file(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    load_optimizer_state(optimizer, folder)
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))
    rank_file = folder / f"rng-{rank}.safetensors"
    if rank_file.is_file():
        set_rng_state(folder, rank)
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
