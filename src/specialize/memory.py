"""How much accelerator memory a training run will need, printed before it starts.

    estimate = estimate_memory(model, cfg, "lora")
    print(estimate)   # memory estimate (lora, ...): weights 2.9 GB + gradients ... = 9.1 GB

Four parts, in bytes:
- weights: every parameter at its stored size (4-bit QLoRA weights count their packed bytes);
- gradients: one per trainable parameter, in the parameter's dtype;
- optimizer: AdamW keeps two moments per trainable parameter in its dtype; 8-bit AdamW one
  byte each (tensors under 4096 elements stay 32-bit in bitsandbytes);
- activations: what backward needs from one micro-step: `finetune` passes the data's largest
  micro-batch (its tokens, and its target tokens), else `micro_batch_size x max_seq_tokens`
  tokens is assumed (the worst case). Per token and layer, a decoder keeps
  its attention inputs/outputs (4h + 2 kv), its MLP inputs/intermediates (h + 4i when gated
  like Llama's SwiGLU, h + 2i otherwise) and two norm inputs (2h), in the compute dtype;
  memory-efficient attention keeps no T x T matrix (unless attention dropout is on, which is
  counted). With gradient checkpointing only each
  layer's input is kept, plus one layer recomputed. LoRA adds each adapted linear's dropped-out
  input (and its mask) and A's output. The output layer adds logits and their fp32
  log-probabilities for the target tokens (the loop projects only those).

`finetune` also passes what the process holds already (its resident set on CPU), so the total
is a projected peak with the runtime in it: on a SmolLM2-135M-shaped model it came within -18%
(LoRA) and +1% (full) of the measured peak RSS (bench/README.md). Otherwise it is the parts
alone (typically within ~30%): allocator fragmentation, the CUDA context (~0.5 GB) and
temporary buffers are not counted.
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import torch

from specialize.config import TrainConfig

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer state for smaller tensors


@dataclass
class MemoryEstimate:
    """Bytes per part; `tokens` is the micro-step size the activation figure assumes."""

    method: str
    weights: int
    gradients: int
    optimizer: int
    activations: int | None  # None: not estimated for this architecture (no attention heads: Mamba, RWKV)
    tokens: int
    compute_dtype: str
    optimizer_name: str
    gradient_checkpointing: bool
    resident: int | None = None  # what the process holds already (runtime, weights, data), when measured

    @property
    def total(self) -> int:
        held = self.resident if self.resident is not None else self.weights
        return held + self.gradients + self.optimizer + (self.activations or 0)

    def __str__(self) -> str:
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        activations = ("(not estimated for this architecture)" if self.activations is None
                       else _human(self.activations))
        held = (f"held now {_human(self.resident)} (runtime, weights {_human(self.weights)}, data)"
                if self.resident is not None else f"weights {_human(self.weights)}")
        overhead = "" if self.resident is not None else ", plus framework overhead"
        return (f"memory estimate ({self.method}, {self.compute_dtype} compute, {self.tokens:,} tokens per "
                f"micro-step{checkpointing}): {held} + gradients {_human(self.gradients)} "
                f"+ optimizer {_human(self.optimizer)} ({self.optimizer_name}) + activations "
                f"{activations} = {_human(self.total)} (±30%{overhead})")


def resident_bytes(device) -> int | None:
    """What this process holds now: CUDA memory allocated on a GPU, else its resident set
    (Linux's /proc); None where neither can be read (the estimate then counts the weights alone)."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _config_value(config, *names: str, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def compute_bytes(model, precision: str) -> int:
    """Bytes per activation element: 2 under bf16/fp16 (autocast or half weights), else 4."""
    if precision in ("bf16", "fp16"):
        return 2
    if precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return 2
    floating = [p for p in model.parameters() if p.dtype.is_floating_point]
    return floating[0].element_size() if floating else 4


def activation_elements_per_token(model) -> tuple[int, int] | None:
    """(elements kept per token per layer, number of layers) for a decoder-only transformer;
    None for a config without attention heads (state-space and RNN models: Mamba, RWKV)."""
    config = model.config
    hidden = _config_value(config, "hidden_size", "n_embd")
    layers = _config_value(config, "num_hidden_layers", "n_layer")
    heads = _config_value(config, "num_attention_heads", "n_head")
    if not (hidden and layers and heads):
        return None
    kv_heads = _config_value(config, "num_key_value_heads", default=heads)
    head_dim = _config_value(config, "head_dim", default=hidden // heads)
    intermediate = _config_value(config, "intermediate_size", "n_inner", default=4 * hidden)
    kv = kv_heads * head_dim
    gated = any(name.endswith("gate_proj") for name, _ in model.named_modules())
    attention = 4 * hidden + 2 * kv
    mlp = hidden + (4 if gated else 2) * intermediate
    norms = 2 * hidden
    return attention + mlp + norms, layers


def estimate_memory(model, cfg: TrainConfig, method: str, *, tokens: int | None = None,
                    target_tokens: int | None = None, resident: int | None = None) -> MemoryEstimate:
    """Estimate training memory for `model` (after LoRA/QLoRA preparation) under `cfg`.

    Args:
        tokens, target_tokens: the largest micro-batch the data makes (all tokens, and those with a
            target, whose logits are the only ones projected); default the worst case,
            `micro_batch_size x max_seq_tokens` for both.
        resident: bytes the process holds already (`resident_bytes`); the total is then a
            projected peak that includes the runtime, instead of the parts alone.
    """
    params = list(model.parameters())  # tied weights appear once
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    if cfg.optimizer == "adamw_8bit":
        optimizer = sum(2 * p.numel() * (1 if p.numel() >= BNB_MIN_8BIT_SIZE else 4) for p in trainable)
    else:
        optimizer = sum(2 * p.numel() * p.element_size() for p in trainable)

    element = compute_bytes(model, cfg.precision)
    # finetune resolves an unset max_seq_tokens from the data first; other callers get 512's estimate
    seq_tokens = cfg.max_seq_tokens or 512
    tokens = tokens or cfg.micro_batch_size * seq_tokens
    target_tokens = min(target_tokens or tokens, tokens)
    shape = activation_elements_per_token(model)
    if shape is None:
        return MemoryEstimate(method=method, weights=weights, gradients=gradients, optimizer=optimizer,
                              activations=None, tokens=tokens, compute_dtype="bf16/fp16" if element == 2 else "fp32",
                              optimizer_name=cfg.optimizer, gradient_checkpointing=cfg.gradient_checkpointing,
                              resident=resident)
    per_layer, layers = shape
    hidden = _config_value(model.config, "hidden_size", "n_embd")
    vocab = model.get_input_embeddings().num_embeddings
    if cfg.gradient_checkpointing:
        kept = layers * hidden + per_layer  # each layer's input, and one layer recomputed in backward
    else:
        kept = layers * per_layer
    body = tokens * (kept + hidden) * element  # + the final norm's input
    # Attention dropout > 0 forces the unfused kernel, which keeps the T x T probabilities
    # (before and after dropout, plus the mask) for rows of up to max_seq_tokens.
    if _config_value(model.config, "attention_dropout", "attn_pdrop", default=0.0) and not cfg.gradient_checkpointing:
        heads = _config_value(model.config, "num_attention_heads", "n_head")
        body += layers * heads * cfg.micro_batch_size * seq_tokens ** 2 * (2 * element + 1)
    body += tokens * _adapter_inputs(model, element)
    logits = target_tokens * vocab * (element + 4)  # logits where there are targets, and their fp32 log-probs
    return MemoryEstimate(method=method, weights=weights, gradients=gradients, optimizer=optimizer,
                          activations=body + logits, tokens=tokens,
                          compute_dtype="bf16/fp16" if element == 2 else "fp32", optimizer_name=cfg.optimizer,
                          gradient_checkpointing=cfg.gradient_checkpointing, resident=resident)


def _adapter_inputs(model, element: int) -> int:
    """Bytes per token that LoRA adds: each adapted linear keeps its dropped-out input for the
    gradient of A (plus the dropout mask, one byte per element), and A's output for B."""
    total = 0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or not hasattr(module, "in_features"):
            continue
        dropout = getattr(module, "lora_dropout", None)
        dropped = any(getattr(d, "p", 0) > 0 for d in dropout.values()) if dropout is not None else False
        rank = sum(getattr(a, "out_features", 0) for a in lora_a.values())
        total += module.in_features * (element + (1 if dropped else 0)) + rank * element
    return total
