"""A checkpoint that cannot be written (a full disk) is one clear line, leaves no `.step-N.tmp`
behind, and the earlier checkpoints still load."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from specialize import checkpoint
from specialize.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_training(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def save(root: Path, step: int, model, optimizer, scheduler) -> Path:
    """What train.py does for a checkpoint, on one process."""
    tmp = checkpoint.begin(root, step)
    checkpoint.write_rank_files(tmp, 0)
    checkpoint.write_main_files(tmp, model, optimizer, scheduler, {"step": step})
    return checkpoint.commit(root, step, keep=2)


def no_space_in_safetensors(tensors, filename, metadata=None):
    """A disk that fills up halfway through a safetensors file, failing as the library reports it."""
    Path(filename).write_bytes(b"\0" * 64)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def no_space_in_json(data, f):
    f.write('{"param_')
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["safetensors", "json"])
def test_a_full_disk_is_one_line_no_temp_folder_and_the_earlier_checkpoint_loads(tmp_path, monkeypatch, where):
    root = tmp_path / "checkpoints"
    model, optimizer, scheduler = tiny_training(seed=0)
    first = save(root, 1, model, optimizer, scheduler)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # step 2 differs from step 1
    if where == "safetensors":
        monkeypatch.setattr(checkpoint, "save_file", no_space_in_safetensors)
    else:
        monkeypatch.setattr(checkpoint.json, "dump", no_space_in_json)
    with pytest.raises(UserError) as failed:
        save(root, 2, model, optimizer, scheduler)
    assert str(failed.value) == (f"{root}: checkpoint step-2 was not written: the disk is full; the earlier "
                                 "checkpoint step-1 is intact (resume from it with --resume)")
    assert "\n" not in str(failed.value)
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # no .step-2.tmp left behind
    monkeypatch.undo()
    assert checkpoint.latest(root) == first
    fresh, fresh_optimizer, fresh_scheduler = tiny_training(seed=1)
    assert checkpoint.load(first, fresh, fresh_optimizer, fresh_scheduler, rank=0) == {"step": 1}
    assert all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)


def test_the_first_checkpoint_failing_says_there_is_no_earlier_one(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", no_space_in_safetensors)
    with pytest.raises(UserError, match=r"checkpoint step-5 was not written: the disk is full; "
                                        r"there is no earlier checkpoint$"):
        save(tmp_path / "checkpoints", 5, *tiny_training(seed=0))
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_real_write_error_from_safetensors_is_one_line(tmp_path):
    """No monkeypatching: the OS refuses the write (a file size limit, EFBIG), safetensors reports it."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from specialize.errors import UserError
        from test_checkpoint_disk import save, tiny_training
        root = Path({str(tmp_path / "checkpoints")!r})
        save(root, 1, *tiny_training(seed=0))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
        try:
            save(root, 2, *tiny_training(seed=0))
        except UserError as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stderr == "" and done.returncode == 0, done.stderr
    root = tmp_path / "checkpoints"
    assert done.stdout == (f"{root}: checkpoint step-2 was not written: File too large; the earlier checkpoint "
                           "step-1 is intact (resume from it with --resume)\n")
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]
    assert json.loads((root / "step-1" / "trainer_state.json").read_text()) == {"step": 1}
