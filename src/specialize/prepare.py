"""What every fine-tuning objective does before its loop: load the base in the method's dtype,
resolve the method and learning rate (printing why), add LoRA, and estimate memory.

    model, cfg, trainable, total = prepare_model(cfg, accelerator, choices, largest_micro_batch(items, cfg))

`finetune` (SFT) and the preference and reward objectives (`specialize.objectives`) share it, so a
DPO run loads, sizes and reports its model exactly as an SFT run does.
"""

from __future__ import annotations

import torch
from accelerate.utils import set_seed
from rich.console import Console
from rich.text import Text

from specialize import defaults
from specialize.config import FinetuneConfig
from specialize.memory import estimate_memory, resident_bytes
from specialize.model import add_lora, count_parameters, load_model, pick_dtype

console = Console(stderr=True, markup=False)  # paths and data are printed verbatim


def weights_dtype(cfg: FinetuneConfig, device):
    """Full fine-tuning keeps fp32 master weights (bf16 comes from autocast): in bf16 weights, most
    updates at fine-tuning learning rates (~1e-5) are below the format's resolution and vanish.
    Frozen LoRA bases can be stored in the compute dtype (`auto` decides after loading, in fp32)."""
    if cfg.method in ("full", "auto") and cfg.precision == "auto":
        return torch.float32
    return pick_dtype(cfg.precision, device)


def largest_micro_batch(items, cfg: FinetuneConfig) -> tuple[int, int]:
    """(tokens, target tokens) of the largest micro-batch the data can make: the memory estimate's
    activations follow the data, not `micro_batch_size x max_seq_tokens` (packed rows hold the
    examples' real lengths, and only target positions are projected to the vocabulary)."""
    lengths = sorted((len(i.input_ids) for i in items), reverse=True)[:cfg.micro_batch_size]
    targets = sorted((i.target_tokens for i in items), reverse=True)[:cfg.micro_batch_size]
    tokens = sum(lengths) if cfg.packing else len(lengths) * (lengths[0] if lengths else 0)
    return tokens, sum(targets)


def prepare_model(cfg: FinetuneConfig, accelerator, choices: list,
                   micro_batch: tuple[int, int] | None = None) -> tuple:
    """Load the base, resolve method and learning rate, add LoRA: (model, resolved cfg, trainable, total)."""
    main = accelerator.is_main_process
    method = cfg.method
    counted = defaults.model_parameters(cfg.base, cfg.trust_remote_code) if method == "auto" else None
    if counted is not None:  # decided before loading, so the weights load once, in the method's dtype
        choices.append(defaults.method(counted))
        method = choices[-1].value
    model = load_model(cfg.base, trust_remote_code=cfg.trust_remote_code, quantize_4bit=method == "qlora",
                       dtype=weights_dtype(cfg.model_copy(update={"method": method}), accelerator.device),
                       merge_adapter=True)  # a LoRA run: merged
    parameters = count_parameters(model)[1]
    if method == "auto":  # the config alone could not tell
        choices.append(defaults.method(parameters))
        method = choices[-1].value
        if method == "lora" and (dtype := pick_dtype(cfg.precision, accelerator.device)) != model.dtype:
            model = model.to(dtype)  # a frozen base may live in the compute dtype (bf16 on GPUs)
    if cfg.learning_rate is None:
        choices.append(defaults.learning_rate(method, parameters))
    cfg = cfg.model_copy(update={"method": method, "learning_rate": cfg.learning_rate or choices[-1].value})
    if main:
        for choice in choices:
            console.print(str(choice))
    set_seed(cfg.seed)  # LoRA's initial weights are drawn here
    if cfg.method in ("lora", "qlora"):
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                         quantized=cfg.method == "qlora")
    trainable, total = count_parameters(model)
    if main:
        console.print(f"model: {total:,} parameters, {trainable:,} trainable ({cfg.method})")
        tokens, targets = micro_batch or (None, None)
        # Measured only where the weights already are (CPU runs); on a GPU they move there later.
        where = next(model.parameters()).device
        resident = resident_bytes(where) if where.type == accelerator.device.type else None
        console.print(str(estimate_memory(model, cfg, cfg.method, tokens=tokens, target_tokens=targets,
                                          resident=resident)))
    return model, cfg, trainable, total


def warn(message: str) -> None:
    console.print(Text.assemble(("warning:", "yellow"), " ", message), highlight=False)



def disable_dropout(model) -> None:
    """Preference objectives compare the policy with the reference on the same tokens: with dropout
    the two differ by noise (step 1's log-ratio would not be 0), so it is off, as in TRL by default."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # attention that applies dropout functionally (Llama, Qwen, ...)
