"""model loading: a LoRA run as a training base (merged, plain, trainable), LoRA on LoRA, safetensors only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import QA8
from peft import PeftModel

from specialize.config import FinetuneConfig
from specialize.errors import UserError
from specialize.finetune import finetune
from specialize.model import add_lora, count_parameters, load_model, load_tokenizer, save_model

IDS = torch.tensor([[3, 17, 42, 99, 5, 250, 11]])  # (1, T): any ids in the 512-token test vocabulary


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama) -> Path:
    """A short LoRA run; its adapter's B matrices are non-zero after a few steps, so it moves the logits."""
    out = tmp_path_factory.mktemp("lora-run") / "lora"
    return finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=out, method="lora", lora_rank=4,
                                   epochs=3, learning_rate=1e-2, micro_batch_size=8, warmup_steps=0,
                                   progress=False))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits  # (1, T, V)


def test_a_lora_run_loads_as_a_plain_trainable_base_with_the_adapters_logits(lora_run, tiny_llama):
    adapter = load_model(lora_run)
    merged = load_model(lora_run, merge_adapter=True)
    assert isinstance(adapter, PeftModel)
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    trainable, total = count_parameters(merged)
    assert trainable == total  # what --method full needs
    assert (logits(merged) - logits(adapter)).abs().max().item() <= 1e-5
    assert (logits(merged) - logits(load_model(tiny_llama))).abs().max().item() > 1e-3  # the adapter is in


def test_full_and_lora_training_both_start_from_a_lora_run(lora_run):
    merged = load_model(lora_run, merge_adapter=True).train()
    merged(input_ids=IDS, labels=IDS).loss.backward()  # crashed before: nothing required grad
    assert all(p.grad is not None for p in merged.parameters())

    lora = add_lora(load_model(lora_run, merge_adapter=True), rank=4, alpha=8, dropout=0.0, target_modules=None)
    assert not isinstance(lora.get_base_model(), PeftModel)  # one LoRA wrapper, not one inside another
    assert sum(isinstance(m, PeftModel) for m in lora.modules()) == 1


def test_lora_trained_on_a_lora_run_reloads_with_both_adapters(lora_run, tmp_path):
    model = add_lora(load_model(lora_run, merge_adapter=True), rank=4, alpha=8, dropout=0.0, target_modules=None)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as if trained: a fresh adapter (B = 0) would change nothing
            p.data.normal_(0.0, 0.05)
    save_model(model, load_tokenizer(lora_run), tmp_path / "second" / "model")
    saved = json.loads((tmp_path / "second" / "model" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((lora_run / "model").resolve())
    reloaded = load_model(tmp_path / "second" / "model")
    assert (logits(reloaded) - logits(model)).abs().max().item() <= 1e-5
    assert (logits(reloaded) - logits(load_model(lora_run))).abs().max().item() > 1e-3


def test_an_adapter_without_safetensors_is_refused_and_never_unpickled(lora_run, tmp_path, monkeypatch):
    folder = tmp_path / "pickled-adapter"
    folder.mkdir()
    shutil.copy(lora_run / "model" / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not a pickle anyone should open")

    def unpickle(*args, **kwargs):
        raise AssertionError("adapter_model.bin was unpickled")

    monkeypatch.setattr(torch, "load", unpickle)
    expected = re.escape(f"{folder.resolve()}: LoRA adapter folder has no adapter_model.safetensors")
    for ref in (folder, str(folder)):
        with pytest.raises(UserError, match=expected):
            load_model(ref)
        with pytest.raises(UserError, match=expected):
            load_model(ref, merge_adapter=True)


def test_a_mistyped_local_folder_says_it_was_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # HF_HUB_OFFLINE=1 in tests: the lookup fails at once
    with pytest.raises(UserError, match=r"cannot load tokenizer 'models/mine' \(no local folder of that name, "
                                        r"so it was looked up as a Hugging Face Hub id\)"):
        load_tokenizer("models/mine")


def _remote_code_base(tiny_llama, folder: Path) -> Path:
    """A base whose config.json asks for model code shipped with it; that code leaves a marker file when run."""
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "shipped", "auto_map": {"AutoConfig": "shipped.ShippedConfig",
                                                     "AutoModelForCausalLM": "shipped.ShippedModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "shipped.py").write_text(
        f"open({str(folder / 'code-ran')!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class ShippedConfig(LlamaConfig):\n    model_type = 'shipped'\n"
        "class ShippedModel(LlamaForCausalLM):\n    config_class = ShippedConfig\n")
    return folder


def test_remote_code_is_never_run_unless_asked(tmp_path, tiny_llama):
    from specialize import config as configs

    for stage in vars(configs).values():
        if isinstance(stage, type) and "trust_remote_code" in getattr(stage, "model_fields", {}):
            assert stage.model_fields["trust_remote_code"].default is False, stage.__name__
    base = _remote_code_base(tiny_llama, tmp_path / "shipped")
    with pytest.raises(UserError, match="contains custom code which must be executed"):
        finetune(FinetuneConfig(base=str(base), data=[str(QA8)], out=tmp_path / "run", max_steps=1, progress=False))
    with pytest.raises(UserError, match="contains custom code which must be executed"):
        load_model(base)
    assert not (base / "code-ran").exists() and not (tmp_path / "run" / "model").exists()
    assert type(load_model(base, trust_remote_code=True)).__name__ == "ShippedModel"  # asked: it runs
    assert (base / "code-ran").exists()


def test_qlora_without_cuda_is_one_clear_error(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^--method qlora needs a CUDA GPU \(4-bit bitsandbytes kernels\); "
                                        r"use --method lora on this machine$"):
        finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=tmp_path / "run", method="qlora",
                                max_steps=1, progress=False))
    assert not (tmp_path / "run" / "model").exists()


def test_loaded_models_never_swap_in_hub_kernels(tiny_llama, lora_run):
    """transformers >= 5.2x turns on Hugging Face Hub kernels by default when the `kernels` package is
    installed (transformers requires it): on CUDA, every train()/eval() then fetches compiled layer code
    from the Hub (kernels-community/rotary, ...), which is remote code nobody asked for and, offline, a
    crash ("not available in the local cache"). Loading must turn them off."""
    for model in (load_model(tiny_llama), load_model(lora_run), load_model(lora_run, merge_adapter=True)):
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        assert base.use_kernels is False
        assert getattr(base, "kernels_mode", None) is None
