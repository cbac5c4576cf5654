"""Multi-process training: `torchrun` on CPU (gloo) trains exactly like one process with more accumulation.

2 processes x micro-batch m x accum a and 1 process x m x 2a see the same examples in every
optimizer step (the data plan depends only on seed and epoch) and normalise the loss by the
same token count, so they end with the same weights up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from specialize.config import FinetuneConfig
from specialize.finetune import finetune
from helpers import QA8

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(max_steps=4, learning_rate=3e-3, warmup_steps=1, eval_fraction=0, progress=False)


# (micro-batch, accumulation per process): 8 examples in 2-example micro-batches split evenly; in
# 3-example ones a step holds 3 micro-batches, so one process runs a target-free copy to stay in step.
@pytest.mark.parametrize("micro, accum", [(2, 1), (3, 2)], ids=["even", "uneven"])
def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, tiny_llama, micro, accum):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(COMMON | {"grad_accum_steps": accum, "micro_batch_size": micro}), encoding="utf-8")
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "specialize", "finetune", "--base", str(tiny_llama), "--data", str(QA8), "--out", str(out),
               "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done: 4 steps") == 1  # one main process, not two lone ones

    single = finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=tmp_path / "single",
                                     grad_accum_steps=2 * accum, micro_batch_size=micro, **COMMON))
    a, b = load_file(out / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (out, single)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    tokens = [json.loads((run / "train_summary.json").read_text())["tokens"] for run in (out, single)]
    assert tokens[0] == tokens[1]  # both runs trained on every example of every step


@pytest.mark.parametrize("name, kind", [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp.yaml", "FSDP"),
                                        ("accelerate_deepspeed_zero3.yaml", "DEEPSPEED")])
def test_accelerate_configs_start_with_their_command(name, kind):
    path = ROOT / "configs" / name
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file configs/{name} -m specialize finetune --config configs/")
    recipe = first.split("--config configs/")[1].split()[0]
    assert (ROOT / "configs" / recipe).is_file()
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert loaded["distributed_type"] == kind and loaded["num_machines"] == 1
