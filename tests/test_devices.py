"""Inference picks its device as training does: CUDA, then Apple's MPS, then CPU.

generate, chat, serve, eval, compare and export's parity check all load models through
`Generator.load`, which places them on `default_device()`. This machine has neither CUDA nor
MPS, so availability is monkeypatched and `Module.to` only records where the model was sent.
"""

from __future__ import annotations

import pytest
import torch

from specialize.generate import Generator, default_device
from specialize.model import pick_dtype


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"),
    (True, False, "cuda"),
    (False, True, "mps"),
    (False, False, "cpu"),
])
def test_default_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert default_device() == torch.device(expected)


def test_a_mac_loads_the_model_on_mps_in_float32(monkeypatch, tiny_llama):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    sent = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: sent.append(args) or self)
    generator = Generator.load(tiny_llama)
    assert generator.device == torch.device("mps") and sent == [(torch.device("mps"),)]
    # fp32 by default: bf16 on MPS needs macOS 14 and is emulated on M1/M2; fp16 can overflow
    # models trained in bf16. --precision bf16/fp16 remain the user's choice.
    assert next(generator.model.parameters()).dtype == torch.float32
    assert pick_dtype("auto", torch.device("mps")) == torch.float32


def test_checkpoints_on_a_mac_keep_the_mps_generator_state(monkeypatch, tmp_path):
    from specialize import checkpoint

    state = {"mps": torch.tensor([7, 8, 9], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state["mps"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda new: state.update(mps=new))
    tmp_path.joinpath(".step-1.tmp").mkdir()
    checkpoint.write_rank_files(tmp_path / ".step-1.tmp", 0)
    state["mps"] = torch.tensor([0, 0, 0], dtype=torch.uint8)  # training went on
    checkpoint.set_rng_state(tmp_path / ".step-1.tmp", 0)
    assert state["mps"].tolist() == [7, 8, 9]  # resumed: dropout masks on the Apple GPU continue as before
