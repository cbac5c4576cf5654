"""Packing: a micro-batch's examples share rows, without seeing each other.

Examples sit side by side in a row with position_ids that restart at 0 for each one and no
attention mask; transformers turns that into a block-diagonal causal mask (varlen kernels on
FlashAttention, a masked dense kernel otherwise). Nothing is padded between examples, so the
linear layers do no wasted work. `packing_is_exact` checks once per run that the model really
keeps packed examples apart (some architectures build positions from the attention mask only);
when it does not, training falls back to padded batches.
"""

from __future__ import annotations

import math

import torch

from specialize.data.tokenize import IGNORE, Batch, Encoded, collate_packed, collate_padded


def _numel(p: torch.Tensor) -> int:
    # DeepSpeed ZeRO-3 (zero.Init) leaves empty placeholders; the real shape is `ds_shape`.
    return math.prod(getattr(p, "ds_shape", p.shape))


def attention_cost(model) -> float:
    """Attention FLOPs per token per unit of row width, relative to the layer's matmul FLOPs.

    A dense (masked) attention over a row of width W costs ~4*h*W FLOPs per token per layer;
    the layer's matmuls cost ~2*P_layer. FlashAttention-style kernels skip the masked blocks,
    so for them a long row costs nothing extra (0.0).
    """
    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", "") or "")
    if "flash" in impl or impl == "flex_attention":
        return 0.0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not hidden or not layers:
        return 0.0
    embedding_ids = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                     for p in m.parameters()}
    body = sum(_numel(p) for p in model.parameters() if id(p) not in embedding_ids)
    return 2.0 * hidden * layers / max(body, 1)


def plan_rows(lengths: list[int], attention_cost: float) -> list[list[int]]:
    """Group item indices into rows (first-fit decreasing) at the cheapest row width.

    Cost model: rows x width x (1 + attention_cost x width) — linear layers pay for tail
    padding, masked attention pays for width. Widths tried: the longest item, then 25% wider
    each time, until all items fit in one row. With attention_cost 0, one row (no padding at
    all) always wins.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    total, capacity = sum(lengths), max(lengths)
    best: list[list[int]] = [order]
    best_cost = total * (1 + attention_cost * total)
    while capacity < total:
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order:
            slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
            if slot is None:
                rows.append([i])
                room.append(capacity - lengths[i])
            else:
                rows[slot].append(i)
                room[slot] -= lengths[i]
        width = max(capacity - free for free in room)
        cost = len(rows) * width * (1 + attention_cost * width)
        if cost < best_cost:
            best, best_cost = rows, cost
        capacity = max(capacity + 1, math.ceil(capacity * 1.25))
    return best


def collate_rows(items: list[Encoded], pad_id: int, attention_cost: float) -> Batch:
    """Pack `items` into rows (see `plan_rows`), each row as `collate_packed` builds it.

    Shorter rows end in a padding segment whose positions restart at 0, so it is a sequence of
    its own: no real token attends to it, and its targets are -100. No attention mask is
    passed, which is what makes transformers read the restarting positions as packing.
    """
    rows = [collate_packed([items[i] for i in row]) for row in plan_rows([len(x.input_ids) for x in items],
                                                                         attention_cost)]
    if len(rows) == 1:
        return rows[0]
    width = max(row.input_ids.shape[1] for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, W)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        n = row.input_ids.shape[1]
        input_ids[r, :n], targets[r, :n], positions[r, :n] = row.input_ids[0], row.targets[0], row.position_ids[0]
        positions[r, n:] -= n
    return Batch(input_ids, targets, None, positions)


def packing_is_exact(model, items: list[Encoded], unwrapped=None) -> bool:
    """Does this model keep packed examples apart? One forward of two short examples, three ways.

    Packed [a, b] and packed [a', b] (a' = a with every token changed) must give the same logits
    for b (no attention across examples), and those must equal b's logits alone (positions
    restart). Architectures that build their mask or positions from the attention mask only
    (OPT, Bloom, MPT in transformers 5) fail and are trained with padding instead. `model` may
    be wrapped (DDP, FSDP: every process runs the same check); `unwrapped` is the plain model.
    """
    unwrapped = unwrapped or model
    a = items[0].input_ids[:24]
    b = items[1 % len(items)].input_ids[:24]
    vocab = unwrapped.get_input_embeddings().num_embeddings
    a_changed = [(t + 1) % vocab for t in a]
    device = next(unwrapped.parameters()).device
    half = any(p.dtype in (torch.bfloat16, torch.float16) or not p.dtype.is_floating_point
               for p in unwrapped.parameters())
    isolation_tol, position_tol = (1e-3, 5e-2) if half else (1e-5, 1e-4)

    def logits_of_b(first: list[int]) -> torch.Tensor:
        ids = torch.tensor([first + b], device=device)
        positions = torch.tensor([list(range(len(first))) + list(range(len(b)))], device=device)
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, len(first):].float()

    was_training = model.training
    model.eval()  # no dropout, and no draw from the RNG a resumed run must replay
    try:
        with torch.no_grad():
            packed, packed_changed, alone = logits_of_b(a), logits_of_b(a_changed), logits_of_b([])
    except (TypeError, ValueError, RuntimeError):
        return False  # e.g. remote code that takes no position_ids: train padded
    finally:
        model.train(was_training)
    scale = max(1.0, float(alone.abs().max()))
    isolated = float((packed - packed_changed).abs().max()) <= isolation_tol * scale
    positioned = float((packed - alone).abs().max()) <= position_tol * scale
    return isolated and positioned


class Collator:
    """Micro-batch tensors for the chosen layout: packed rows, or right-padded rows."""

    def __init__(self, packed: bool, pad_id: int, attention_cost: float):
        self.packed, self.pad_id, self.attention_cost = packed, pad_id, attention_cost

    def __call__(self, items: list[Encoded]) -> Batch:
        if self.packed:
            return collate_rows(items, self.pad_id, self.attention_cost)
        return collate_padded(items, self.pad_id)
