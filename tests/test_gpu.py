"""What only a CUDA device can show: bf16 autocast over fp32 master weights, QLoRA, packing under SDPA
and FlashAttention. Run them with `pytest -m gpu` (the default run deselects them); without CUDA
they are skipped.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import QA8
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from specialize.config import FinetuneConfig
from specialize.data.formats import load_examples
from specialize.data.templates import resolve_template
from specialize.data.tokenize import collate_padded, encode_examples, pad_token_id
from specialize.finetune import finetune
from specialize.packing import collate_rows, packing_is_exact
from specialize.train import token_loss_sum, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _items(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples([str(QA8)])
    template = resolve_template("auto", tokenizer, {e.shape for e in examples})
    return encode_examples(examples, tokenizer, template, 512)[0], pad_token_id(tokenizer)


def _from_pretrained(path, **kwargs):
    """The tests' own loads: without Hub kernels, which transformers would fetch on CUDA (see
    test_model_loading's test_loaded_models_never_swap_in_hub_kernels for specialize's own loads)."""
    return AutoModelForCausalLM.from_pretrained(path, use_kernels=False, **kwargs)


def _mean_loss(model, batch) -> float:
    with torch.no_grad():
        return float(token_loss_sum(model, batch.to("cuda"))) / batch.target_tokens


def test_bf16_autocast_trains_fp32_master_weights(tmp_path, tiny_llama):
    """At fine-tuning learning rates most AdamW updates are below bf16's resolution: weights stay fp32."""
    assert torch.cuda.is_bf16_supported()
    items, pad = _items(tiny_llama)
    model = _from_pretrained(tiny_llama)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = set()
    model.model.layers[0].mlp.down_proj.register_forward_hook(  # training forwards (the packing check runs no_grad)
        lambda m, args, out: seen.add(out.dtype) if torch.is_grad_enabled() else None)
    cfg = FinetuneConfig(max_steps=3, micro_batch_size=4, learning_rate=1e-5, warmup_steps=0, progress=False)
    model, result = train(model, items, [], cfg, tmp_path / "train", pad_id=pad)
    assert seen == {torch.bfloat16}  # compute under bf16 autocast
    assert result.packed
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.device.type == "cuda", name
    weight = "model.layers.0.mlp.down_proj.weight"
    after = dict(model.named_parameters())[weight].detach().cpu()
    assert (after != before[weight]).float().mean() > 0.9  # fp32 master weights took the updates...
    assert (after.bfloat16() == before[weight].bfloat16()).float().mean() > 0.5  # ...that bf16 weights would lose

    run = Path(finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=tmp_path / "run", max_steps=2,
                                       learning_rate=1e-5, progress=False)))
    assert {t.dtype for t in load_file(run / "model" / "model.safetensors").values()} == {torch.float32}


def test_qlora_trains_adapters_over_a_4bit_base(tmp_path, tiny_llama):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        pytest.skip(f"QLoRA needs bitsandbytes, which does not import here ({e}); pip install 'specialize[qlora]'")
    from specialize.generate import Generator
    from specialize.model import load_model

    run = Path(finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=tmp_path / "qlora",
                                       method="qlora", lora_rank=8, lora_alpha=16, lora_dropout=0.0, max_steps=20,
                                       learning_rate=1e-2, micro_batch_size=8, warmup_steps=0, progress=False)))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["method"] == "qlora" and summary["trainable_parameters"] == 2 * 8192  # as LoRA r=8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {p.name for p in (run / "model").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    quantized = load_model(run, quantize_4bit=True)
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    answer = Generator.load(run).generate([[{"role": "user", "content": "What do bees make?"}]], max_new_tokens=8)[0]
    assert answer.completion_tokens > 0


@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_packed_rows_equal_padded_batches_on_cuda(tiny_llama, attention):
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attention_2 needs the flash-attn package, which is not installed here")
    dtype = torch.bfloat16 if attention == "flash_attention_2" else torch.float32  # FlashAttention: half only
    model = _from_pretrained(tiny_llama, attn_implementation=attention, dtype=dtype).cuda().eval()
    items, pad = _items(tiny_llama)
    assert packing_is_exact(model, items)
    padded = _mean_loss(model, collate_padded(items, pad))
    rows = collate_rows(items, pad, attention_cost=1.0)
    assert rows.input_ids.shape[0] > 1  # several rows, each holding several examples
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert _mean_loss(model, rows) == pytest.approx(padded, rel=tolerance)
