"""The training engine's speed options change speed, not results; the memory estimate and MFU math are exact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from specialize.config import FinetuneConfig
from specialize.data.formats import load_examples
from specialize.data.templates import resolve_template
from specialize.data.tokenize import encode_examples, pad_token_id
from specialize.memory import estimate_memory
from specialize.model import add_lora
from specialize.optim import make_optimizer
from specialize.train import TrainResult, train
from helpers import QA8, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _items(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples([str(QA8)])
    template = resolve_template("auto", tokenizer, {e.shape for e in examples})
    return encode_examples(examples, tokenizer, template, 512)[0], pad_token_id(tokenizer)


# tiny_llama (conftest): vocab 512, hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, tied embeddings
TINY_PARAMS = 512 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
# kept per token per layer: attention 4h + 2kv, SwiGLU MLP h + 4i, two norms 2h
TINY_PER_LAYER = (4 * 64 + 2 * 32) + (64 + 4 * 128) + 2 * 64


def test_memory_estimate_of_a_model_without_attention_heads_is_partial_not_fatal():
    from transformers import MambaConfig

    model = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                         state_size=4))
    estimate = estimate_memory(model, FinetuneConfig(precision="fp32"), "full")
    n = sum(p.numel() for p in model.parameters())
    assert estimate.activations is None and estimate.total == n * 4 * 4  # weights, gradients, two moments
    assert "activations (not estimated for this architecture)" in str(estimate)


def test_memory_estimate_follows_the_data_and_the_process(tiny_llama):
    """With the data's largest micro-batch (tokens, targets) and what the process holds now, the
    total is a projected peak: resident + gradients + optimizer + activations (logits at targets only)."""
    from specialize.memory import resident_bytes

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = FinetuneConfig(micro_batch_size=4, max_seq_tokens=100, precision="fp32")
    held = resident_bytes(torch.device("cpu"))
    assert held is None or held > TINY_PARAMS * 4  # the runtime and the weights
    estimate = estimate_memory(model, cfg, "full", tokens=150, target_tokens=30, resident=10_000_000)
    assert estimate.tokens == 150
    assert estimate.activations == 150 * (2 * TINY_PER_LAYER + 64) * 4 + 30 * 512 * (4 + 4)
    assert estimate.total == 10_000_000 + estimate.gradients + estimate.optimizer + estimate.activations
    assert "held now 10.0 MB (runtime, weights 427.3 KB, data)" in str(estimate)
    assert "framework overhead" not in str(estimate)


def test_memory_estimate_full_fp32_exact(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS
    cfg = FinetuneConfig(micro_batch_size=4, max_seq_tokens=100, precision="fp32")
    estimate = estimate_memory(model, cfg, "full")
    tokens = 4 * 100
    assert estimate.weights == TINY_PARAMS * 4
    assert estimate.gradients == TINY_PARAMS * 4
    assert estimate.optimizer == 2 * TINY_PARAMS * 4  # AdamW: two fp32 moments
    assert estimate.activations == tokens * (2 * TINY_PER_LAYER + 64) * 4 + tokens * 512 * (4 + 4)
    assert estimate.total == estimate.weights + estimate.gradients + estimate.optimizer + estimate.activations
    text = str(estimate)
    assert text.startswith("memory estimate (full, fp32 compute, 400 tokens per micro-step)")
    assert "weights 427.3 KB" in text and "optimizer 854.5 KB (adamw)" in text

    checkpointed = estimate_memory(model, cfg.model_copy(update={"gradient_checkpointing": True}), "full")
    assert checkpointed.activations == tokens * (2 * 64 + TINY_PER_LAYER + 64) * 4 + tokens * 512 * 8
    bf16 = estimate_memory(model, cfg.model_copy(update={"precision": "bf16"}), "full")
    assert bf16.weights == estimate.weights  # fp32 weights under bf16 autocast
    assert bf16.activations == tokens * (2 * TINY_PER_LAYER + 64) * 2 + tokens * 512 * (2 + 4)


def test_memory_estimate_lora_and_8bit_count_only_trainable(tiny_llama):
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), rank=4, alpha=8, dropout=0.0,
                     target_modules=["q_proj", "v_proj"])
    # q_proj 64->64 and v_proj 64->32, per layer: A (4 x 64) and B (out x 4)
    lora = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    estimate = estimate_memory(model, FinetuneConfig(micro_batch_size=1, max_seq_tokens=10), "lora")
    assert estimate.weights == (TINY_PARAMS + lora) * 4
    assert estimate.gradients == lora * 4
    assert estimate.optimizer == 2 * lora * 4
    eight_bit = estimate_memory(model, FinetuneConfig(optimizer="adamw_8bit"), "lora")
    assert eight_bit.optimizer == 2 * lora * 4  # every LoRA tensor is under 4096 elements: bnb keeps them 32-bit
    full_8bit = estimate_memory(AutoModelForCausalLM.from_pretrained(tiny_llama), FinetuneConfig(optimizer="adamw_8bit"),
                                "full")
    small = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters() if p.numel() < 4096)
    assert full_8bit.optimizer == 2 * (TINY_PARAMS - small) + 8 * small


def test_mfu_flop_formula():
    mfu = _bench("gpu_mfu")
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"))
    body, head = mfu.matmul_parameters(config)
    assert (body, head) == (linear, 64 * 1000)
    assert mfu.flops_per_token(config, span=100) == 6 * (linear + 64_000) + 12 * 3 * 4 * 16 * 100
    # two sequences of 100 and 300 tokens, 250 of them targets: span = (100^2 + 300^2) / 400 = 250
    assert mfu.step_flops(config, [100, 300], 250) == pytest.approx(
        400 * (6 * (linear + 64_000) + 12 * 3 * 4 * 16 * 250) - 6 * 64_000 * 150)
    assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mfu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mfu.peak_flops("NVIDIA H200") == 989e12
    assert mfu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert mfu.peak_flops("NVIDIA L4") == 121e12
    assert mfu.peak_flops("NVIDIA L40S") == 362e12
    assert mfu.peak_flops("Some New GPU") is None
    assert mfu.mfu(989e12 * 0.4 * 2, 2.0, 989e12) == pytest.approx(0.4)
    if not torch.cuda.is_available():
        assert mfu.main([]) == 2  # a clear message, exit code 2


def test_fused_adamw_on_cpu_matches_the_reference_loop(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = FinetuneConfig(learning_rate=1e-2, weight_decay=0.1)
    fused = make_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW([{"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                               {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-2, foreach=False)
    ids = torch.randint(0, 512, (2, 12))
    for _ in range(3):
        for m, opt in ((model, fused), (reference, plain)):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters())) <= 1e-6


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, tiny_llama):
    items, pad = _items(tiny_llama)
    weights, layer_calls = [], []
    for checkpointing in (False, True):
        cfg = FinetuneConfig(max_steps=3, micro_batch_size=4, learning_rate=3e-3, warmup_steps=0, progress=False,
                             gradient_checkpointing=checkpointing)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        calls = []
        # A pre-hook inside the layer: the layer's own hooks stay outside the checkpoint, and a recompute
        # stops as soon as backward has what it needs (so post-hooks may never see it finish).
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))
        model, result = train(model, items, [], cfg, tmp_path / str(checkpointing), pad_id=pad)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        layer_calls.append(calls)
        assert result.packed
        json.dumps(result.summary())  # what train_summary.json gets
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= 1e-6
    # Really on: each of the 3 micro-steps runs the layer once more, recomputing it in backward.
    assert layer_calls[1].count(True) == 2 * layer_calls[0].count(True) == 2 * 3


@pytest.mark.parametrize("packing", [False, True])
def test_one_sgd_step_follows_the_token_mean_of_the_whole_step(tmp_path, tiny_llama, monkeypatch, packing):
    """An independent reference for loss normalisation: micro-batches of unequal length, one plain SGD
    step at lr 1, against autograd of `model(labels=...)`'s token mean over all of the step's targets."""
    import specialize.train

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"question": "Q" + "x" * (5 * i) + "?", "answer": "A" + " word" * (3 * i + 1) + "."} for i in range(8)]
    examples = load_examples([str(write_jsonl(tmp_path / "varied.jsonl", rows))])
    items = encode_examples(examples, tokenizer, resolve_template("qa", tokenizer), 512)[0]
    assert len({item.target_tokens for item in items}) == 8

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    width = max(len(item.input_ids) for item in items)
    pad = pad_token_id(tokenizer)
    ids = torch.tensor([i.input_ids + [pad] * (width - len(i.input_ids)) for i in items])  # (8, T)
    labels = torch.tensor([i.labels + [-100] * (width - len(i.input_ids)) for i in items])  # (8, T)
    mask = torch.tensor([[1] * len(i.input_ids) + [0] * (width - len(i.input_ids)) for i in items])  # (8, T)
    reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    expected = {name: p.grad for name, p in reference.named_parameters()}

    # What a mean of per-sequence means would give instead: the test must tell the two apart.
    per_sequence = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.stack([per_sequence(input_ids=ids[i: i + 1], attention_mask=mask[i: i + 1],
                              labels=labels[i: i + 1]).loss for i in range(8)]).mean().backward()
    other = dict(per_sequence.named_parameters())
    assert max((other[n].grad - g).abs().max().item() for n, g in expected.items()) > 1e-3

    monkeypatch.setattr(specialize.train, "make_optimizer", lambda model, cfg: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = FinetuneConfig(max_steps=1, micro_batch_size=2, grad_accum_steps=4, learning_rate=1.0, warmup_steps=0,
                         lr_schedule="constant", max_grad_norm=None, packing=packing, progress=False)
    model, result = train(model, items, [], cfg, tmp_path / "run", pad_id=pad)
    assert result.packed == packing
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_train_result_summary_leaves_out_the_state_dict():
    result = TrainResult(3, 100, 1.5, 2.0, None, True, full_state_dict={"w": torch.zeros(2)})
    assert result.summary() == {"steps": 3, "tokens": 100, "seconds": 1.5, "train_loss": 2.0, "eval_loss": None,
                                "packed": True}


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules_equal_transformers(schedule):
    """Written out in train.py (importing transformers' versions costs start-up time); same values."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    from specialize.optim import make_schedule

    reference = {"cosine": lambda o: get_cosine_schedule_with_warmup(o, 3, 20),
                 "linear": lambda o: get_linear_schedule_with_warmup(o, 3, 20),
                 "constant": lambda o: get_constant_schedule_with_warmup(o, 3)}[schedule]
    ours_opt, ref_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2))
    ours, ref = make_schedule(ours_opt, FinetuneConfig(lr_schedule=schedule, warmup_steps=3), 20), reference(ref_opt)
    for _ in range(20):
        assert ours.get_last_lr() == ref.get_last_lr()
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()
