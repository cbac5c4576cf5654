"""Preemption: SIGTERM or Ctrl-C during training ends it at a step boundary with a checkpoint,
exit code 143 / 130, and `--resume` then ends with the same weights as a run never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import QA8
from specialize import checkpoint
from specialize.config import FinetuneConfig
from specialize.data.formats import load_examples
from specialize.data.templates import resolve_template
from specialize.data.tokenize import encode_examples, pad_token_id
from specialize.errors import Stopped
from specialize.train import train


def _items(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples([str(QA8)])
    template = resolve_template("auto", tokenizer, {e.shape for e in examples})
    return encode_examples(examples, tokenizer, template, 512)[0], pad_token_id(tokenizer)


def test_sigterm_checkpoints_the_step_and_resume_is_bit_identical(tmp_path, tiny_llama):
    items, pad = _items(tiny_llama)
    cfg = dict(max_steps=6, micro_batch_size=3, learning_rate=3e-3, warmup_steps=1, progress=False)

    def run(out: Path, resume: bool = False, signal_at: int | None = None):
        def on_step(step, _row):
            if step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, in the middle of a step's work
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        return train(model, items, [], FinetuneConfig(out=out, resume=resume, **cfg), out, pad_id=pad,
                     callback=on_step)[0]

    reference = run(tmp_path / "straight")
    with pytest.raises(Stopped) as stopped:
        run(tmp_path / "stopped", signal_at=3)
    assert stopped.value.exit_code == 143
    assert "stopped by SIGTERM at step 3/6" in str(stopped.value) and "--resume" in str(stopped.value)
    assert checkpoint.latest(tmp_path / "stopped" / "checkpoints").name == "step-3"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are restored after training
    resumed = run(tmp_path / "stopped", resume=True)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_a_signal_at_the_last_step_just_finishes(tmp_path, tiny_llama):
    items, pad = _items(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = FinetuneConfig(max_steps=2, micro_batch_size=4, progress=False)
    _, result = train(model, items, [], cfg, tmp_path, pad_id=pad,
                      callback=lambda step, row: step == 2 and os.kill(os.getpid(), signal.SIGTERM))
    assert result.steps == 2


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_cli_stops_within_seconds_with_the_signals_exit_code(tmp_path, tiny_llama, signum, code):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "specialize", "finetune", "--base", str(tiny_llama), "--data", str(QA8),
         "--out", str(out), "--max-steps", "100000", "--micro-batch-size", "2", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.1)
        process.send_signal(signum)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert time.monotonic() - sent < 30
    assert process.returncode == code, stderr
    stopped_at = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    said = " ".join(stderr.split())
    assert f"stopped by {signal.Signals(signum).name} at step {stopped_at}/100000" in said
    assert checkpoint.latest(out / "checkpoints").name == f"step-{stopped_at}"
    assert not (out / "model").exists()  # no final model that looks complete


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find torchrun's workers")
def test_under_torchrun_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path, tiny_llama):
    """Only rank 1 is signalled; rank 0 learns of it through the all-reduce, and both stop at the
    same step, where the (main-process) checkpoint is written with every rank taking part."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "specialize", "finetune", "--base", str(tiny_llama), "--data", str(QA8), "--out", str(out),
               "--max-steps", "100000", "--micro-batch-size", "2", "--eval-fraction", "0", "--no-progress"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.2)
        workers = {_rank_of(pid): pid for pid in _children(process.pid)}
        os.kill(workers[1], signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    stopped_at = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    said = " ".join(stderr.split())
    assert said.count(f"stopped by SIGTERM at step {stopped_at}/100000") == 2, stderr[-3000:]  # both ranks
    assert checkpoint.latest(out / "checkpoints").name == f"step-{stopped_at}"
    assert process.returncode != 0 and not (out / "model").exists()
