"""The next-token loss: computed only where there are targets, and the held-out loss.

`token_loss_sum` is the training loop's default objective (`train.train(loss=...)`): the sum of
cross-entropy over a batch's target tokens, which the loop divides by the step's target tokens.
`evaluate_loss` is the mean of the same over held-out items, sharded across processes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from specialize.batches import blank, even_share
from specialize.config import TrainConfig
from specialize.data.tokenize import IGNORE, Batch, Encoded
from specialize.packing import Collator, attention_cost, packing_is_exact


def accepts_logits_to_keep(model) -> bool:
    """transformers >= 5 causal LMs take `logits_to_keep` (a boolean (B, T) mask keeps those positions)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def token_loss_sum(model, batch: Batch, only_targets: bool = False) -> torch.Tensor:
    """Sum of cross-entropy over the batch's target tokens (a scalar).

    With `only_targets`, the model projects only target positions to the vocabulary
    (logits (N, V) instead of (B, T, V)); the loss is the same, minus the wasted work.
    """
    keep = batch.targets != IGNORE  # (B, T)
    extra = {"logits_to_keep": keep} if only_targets else {}
    logits = model(**batch.model_inputs(), use_cache=False, **extra).logits
    if logits.ndim == 3:
        logits = logits[keep]  # (N, V)
    # Upcast for a stable log-softmax under bf16 autocast; a no-op in fp32.
    return F.cross_entropy(logits.float(), batch.targets[keep], reduction="sum")


def evaluate_loss(model, items: list[Encoded], cfg: TrainConfig, accelerator: Accelerator, pad_id: int,
                  collate: Callable[[list[Encoded]], Batch] | None = None, only_targets: bool | None = None) -> float:
    """Mean loss per target token over `items`, sharded across processes.

    `collate` defaults to packed rows when `cfg.packing` and the model keeps packed examples
    apart (checked here, as `train` does), else padded batches; `only_targets` to whether the
    model takes `logits_to_keep`.
    """
    unwrapped = accelerator.unwrap_model(model)
    if collate is None:
        packed = cfg.packing and bool(items) and packing_is_exact(model, items, unwrapped)
        collate = Collator(packed, pad_id, attention_cost(unwrapped))
    if only_targets is None:
        only_targets = accepts_logits_to_keep(unwrapped)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    world, size = accelerator.num_processes, cfg.micro_batch_size
    shard = items[accelerator.process_index:: world]
    own = [collate(shard[start: start + size]) for start in range(0, len(shard), size)]
    if not own and items and world > 1:  # fewer items than processes: this one only keeps the others company
        own = [blank(collate(items[:1]))]
    batches = even_share(own, math.ceil(len(items) / world / size) * world, world)
    with torch.no_grad():
        for batch in batches:
            tokens = batch.target_tokens
            with accelerator.autocast():
                total[0] += token_loss_sum(model, batch.to(accelerator.device), only_targets).double()
            total[1] += tokens
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))
