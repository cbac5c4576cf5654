"""The one training loop, shared by pre-training and fine-tuning, on accelerate.

Vocabulary: a *micro-step* is one forward/backward of `micro_batch_size` examples on one
process; an *optimizer step* is `grad_accum_steps` micro-steps on every process, then one
update. The loss of an optimizer step is the sum of token losses over all of its micro-steps
on all processes, divided by the number of target tokens in the whole step — not a mean of
micro-batch means, which would weigh a short answer's tokens more than a long one's.

Full fine-tuning vs LoRA is decided before this loop (model preparation), not in it. The same
loop runs on one CPU, one GPU, `torchrun`/`accelerate launch` DDP, FSDP and DeepSpeed: the
data plan depends only on (seed, epoch), so 2 processes x accum a equal 1 process x accum 2a.

Speed, without changing the result:
- packing: a micro-batch's examples share rows with restarting position_ids and no padding
  between them; transformers turns that into a block-diagonal causal mask (checked once per
  run by `packing_is_exact`, else padded batches are used);
- rows are laid out by `plan_rows` to trade tail padding against attention over long rows;
- logits and the loss are computed only at target positions (`logits_to_keep`), which skips
  the output projection for prompt tokens: on 150k-vocabulary models that is most of the
  logits memory.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from specialize import checkpoint
from specialize.config import TrainConfig
from specialize.data.tokenize import IGNORE, Batch, Encoded, collate_packed, collate_padded
from specialize.errors import UserError


@dataclass
class TrainResult:
    steps: int
    tokens: int  # target tokens trained on
    seconds: float
    train_loss: float | None
    eval_loss: float | None
    packed: bool = False  # whether packing was used (it is turned off for architectures that mix packed examples)
    # Sharded runs (FSDP, DeepSpeed ZeRO-3) only: the gathered full state dict, on the main process.
    # Pass it to `save_pretrained(state_dict=...)`; the unwrapped model itself holds shards.
    full_state_dict: dict | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict:
        """The JSON-able fields (for train_summary.json)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "full_state_dict"}


def make_accelerator(precision: str) -> Accelerator:
    """bf16 autocast on GPUs that support it (precision=auto), fp32 on CPU.

    Picks up `torchrun` / `accelerate launch` environments. accelerate only takes the
    multi-process CPU path (gloo) when told `cpu=True`; without it, every process of a CPU
    `torchrun` would train alone, each believing it is the main process.
    """
    mixed = "no"
    if precision in ("bf16", "fp16"):
        mixed = precision
    elif precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        mixed = "bf16"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return Accelerator(mixed_precision=mixed, cpu=launched and not torch.cuda.is_available() and not xpu)


def is_sharded(accelerator: Accelerator) -> bool:
    """FSDP and DeepSpeed hold parameters (and optimizer state) in shards across processes."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def plan_epoch(n_items: int, epoch: int, cfg: TrainConfig, world: int) -> list[list[list[int]]]:
    """The item indices of every micro-batch of every optimizer step of one epoch (all processes).

    The order depends only on (seed, epoch), not on batch sizes or process count, so
    batch 8 x accum 1 and batch 2 x accum 4 (or 2 processes x accum 2) see the same examples
    in the same optimizer step, and a resumed run finds its place by step number alone.
    """
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(n_items, generator=generator).tolist()
    size = cfg.micro_batch_size
    micro = [order[i: i + size] for i in range(0, n_items, size)]
    per_step = cfg.grad_accum_steps * world
    steps = [micro[i: i + per_step] for i in range(0, len(micro), per_step)]
    if world > 1 and steps and len(steps[-1]) < world:
        steps.pop()  # every process needs at least one micro-batch in a step
    return steps


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    # DeepSpeed ZeRO-3 (zero.Init) leaves empty placeholders; the real shape is `ds_shape`.
    return tuple(getattr(p, "ds_shape", p.shape))


def _numel(p: torch.Tensor) -> int:
    return math.prod(_shape(p))


# ---------------------------------------------------------------------------------------------
# Packing: layout of a micro-batch into rows, and the one-time check that it is exact.


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


# ---------------------------------------------------------------------------------------------
# Loss, optimizer, schedule.


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


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Learning-rate multiplier at `step`: linear warmup, then cosine / linear decay to 0, or constant.

    The same values as transformers' get_{cosine,linear,constant}_schedule_with_warmup, written
    out here because importing those pulls in transformers.trainer_utils and peft (~0.15 s of
    start-up for every run).
    """
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total - step) / max(1, total - warmup))


def _schedule(optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(0.03 * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, schedule=cfg.lr_schedule, warmup=warmup,
                                                                total=total_steps))


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters).

    `adamw` and `adamw_fused` use torch's fused kernel wherever it runs (CUDA and CPU, float
    parameters): the same update as the default loop, one kernel instead of ~10 per tensor
    (3.5x faster optimizer step on CPU). `adamw_8bit` keeps both moments in 8 bits (bitsandbytes).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if len(_shape(p)) >= 2]
    no_decay = [p for p in params if len(_shape(p)) < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw_8bit needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused or None)


def data_fingerprint(items: list[Encoded]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item.input_ids).encode())
    return digest.hexdigest()[:16]


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per logged step or eval."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a killed run logged steps its last checkpoint lacks)."""
        if self.enabled and self.path.is_file():
            rows = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")


class Collator:
    """Micro-batch tensors for the chosen layout: packed rows, or right-padded rows."""

    def __init__(self, packed: bool, pad_id: int, attention_cost: float):
        self.packed, self.pad_id, self.attention_cost = packed, pad_id, attention_cost

    def __call__(self, items: list[Encoded]) -> Batch:
        if self.packed:
            return collate_rows(items, self.pad_id, self.attention_cost)
        return collate_padded(items, self.pad_id)


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
    shard = items[accelerator.process_index:: accelerator.num_processes]
    with torch.no_grad():
        for start in range(0, len(shard), cfg.micro_batch_size):
            batch = collate(shard[start: start + cfg.micro_batch_size])
            tokens = batch.target_tokens
            with accelerator.autocast():
                total[0] += token_loss_sum(model, batch.to(accelerator.device), only_targets).double()
            total[1] += tokens
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


# ---------------------------------------------------------------------------------------------
# The loop.


def train(model, train_items: list[Encoded], eval_items: list[Encoded], cfg: TrainConfig, out: Path, *,
          pad_id: int, accelerator: Accelerator | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> tuple[torch.nn.Module, TrainResult]:
    """Train `model` in place; returns the unwrapped model and a summary.

    Writes `out/metrics.jsonl` and `out/checkpoints/step-N/`; resumes from the newest complete
    checkpoint when `cfg.resume`. Under FSDP/DeepSpeed, `result.full_state_dict` holds the
    gathered weights to save (intermediate checkpoints are not written there, see below).
    """
    accelerator = accelerator or make_accelerator(cfg.precision)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    sharded = is_sharded(accelerator)
    if cfg.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    model.train()
    cost = attention_cost(model)
    only_targets = accepts_logits_to_keep(model)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(plan_epoch(len(train_items), 0, cfg, world))
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_items)} examples make no optimizer step with {world} processes")
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = _schedule(optimizer, cfg, total_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # There is no DataLoader to infer it from; "auto" would make prepare() fail.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    model, optimizer = accelerator.prepare(model, optimizer)

    packed = cfg.packing and packing_is_exact(model, train_items, accelerator.unwrap_model(model))
    if cfg.packing and not packed:
        accelerator.print(f"packing is off: {type(accelerator.unwrap_model(model)).__name__} does not keep packed "
                          "examples apart (it ignores restarting position_ids); using padded batches")
    collate = Collator(packed, pad_id, cost)
    if cfg.compile:
        # In place (nn.Module.compile): no wrapper, so unwrapping, checkpoints and no_sync see the same module.
        model.compile()

    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    metrics = MetricsLog(out / "metrics.jsonl", main)
    fingerprint = data_fingerprint(train_items)
    examples_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world
    start_step, tokens_done, elapsed_before = 0, 0, 0.0
    # Dropout draws from here on: seeded per process, and restored from the checkpoint on resume.
    set_seed(cfg.seed + rank)
    if cfg.resume and sharded:
        raise UserError("--resume is not supported under FSDP/DeepSpeed yet (checkpoints are not written there); "
                        "resume with DDP or one process")
    if cfg.resume and (found := checkpoint.latest(ckpt_root)) is not None:
        state = checkpoint.load(found, accelerator.unwrap_model(model), optimizer, scheduler, rank)
        if state["data_fingerprint"] != fingerprint:
            raise UserError(f"cannot resume from {found}: the training data or its tokenisation changed")
        if state.get("examples_per_step", examples_per_step) != examples_per_step:
            raise UserError(f"cannot resume from {found}: it was trained with {state['examples_per_step']} examples per "
                            f"optimizer step, this run has {examples_per_step} (micro_batch_size x grad_accum_steps x "
                            "processes must stay the same, or the data position would be wrong)")
        start_step, tokens_done, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        metrics.truncate_after(start_step)
        accelerator.print(f"resuming from {found} (step {start_step}/{total_steps})")
    elif main and not cfg.resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or steps_per_epoch
    if sharded and cfg.save_every:
        warnings.warn("checkpoints are not written under FSDP/DeepSpeed (no exact resume there yet); "
                      "only the final model is saved", stacklevel=2)
    device = accelerator.device
    plan: list[list[list[int]]] = []
    plan_epoch_index = -1
    started = time.perf_counter()
    last_loss: float | None = None
    eval_loss: float | None = None
    window_tokens, window_start = 0, time.perf_counter()

    with _progress(cfg.progress and main) as bar:
        task = bar.add_task("train", total=total_steps, completed=start_step, info="")
        for step in range(start_step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch != plan_epoch_index:
                plan, plan_epoch_index = plan_epoch(len(train_items), epoch, cfg, world), epoch
            collated = [collate([train_items[i] for i in mb]) for mb in plan[index][rank::world]]
            # The step's target tokens over every process: the one denominator of this step's loss.
            step_tokens = sum(b.target_tokens for b in collated)
            if world > 1:
                step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=device), reduction="sum"))
            # DDP and FSDP average gradients over processes; scaling by `world` turns that into a sum.
            scale = world / max(step_tokens, 1)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, batch in enumerate(collated):
                sync = i == len(collated) - 1
                # DeepSpeed steps inside backward at the accumulation boundary; this tells it where that is.
                accelerator.sync_gradients = sync
                context = accelerator.no_sync(model) if not sync and world > 1 else nullcontext()
                with context, accelerator.autocast():
                    summed = token_loss_sum(model, batch.to(device), only_targets)
                    accelerator.backward(summed * scale)
                loss_sum += summed.detach()
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()  # FSDP2 returns a replicated DTensor
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            if world > 1:
                loss_sum = accelerator.reduce(loss_sum, reduction="sum")
            # One device-to-host copy per step for both numbers.
            stats = torch.stack([loss_sum, torch.as_tensor(grad_norm if grad_norm is not None else float("nan"),
                                                           dtype=torch.float64, device=device)]).tolist()
            last_loss = stats[0] / max(step_tokens, 1)
            grad_norm = None if math.isnan(stats[1]) else stats[1]
            tokens_done += step_tokens
            window_tokens += step_tokens
            done = step + 1
            rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            bar.update(task, completed=done, info=f"loss {last_loss:.4f}  {rate:,.0f} tok/s")
            if done % cfg.log_every == 0 or done == total_steps:
                row = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": last_loss,
                       "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": tokens_done,
                       "tokens_per_s": rate, "elapsed_s": elapsed_before + time.perf_counter() - started}
                metrics.write(row)
                if on_step:
                    on_step(done, row)
                window_tokens, window_start = 0, time.perf_counter()
            if eval_items and (done % eval_every == 0 or done == total_steps):
                eval_loss = evaluate_loss(model, eval_items, cfg, accelerator, pad_id, collate, only_targets)
                metrics.write({"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
            if done % save_every == 0 and done < total_steps and not sharded:
                _save_checkpoint(accelerator, model, optimizer, scheduler, ckpt_root, cfg, {
                    "step": done, "epoch": epoch, "index_in_epoch": index + 1, "tokens": tokens_done,
                    "examples_per_step": examples_per_step, "data_fingerprint": fingerprint,
                    "elapsed_s": elapsed_before + time.perf_counter() - started})

    accelerator.wait_for_everyone()
    seconds = elapsed_before + time.perf_counter() - started
    result = TrainResult(total_steps, tokens_done, seconds, last_loss, eval_loss, packed)
    if sharded:
        # Every process takes part in gathering; the main process gets the full weights.
        result.full_state_dict = accelerator.get_state_dict(model)
    return accelerator.unwrap_model(model), result


def _enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (transformers 5 name, older fallback)."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad (breaks LoRA)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _save_checkpoint(accelerator, model, optimizer, scheduler, root: Path, cfg: TrainConfig, state: dict) -> None:
    """DDP/one process only: every rank holds the full model and optimizer, the main one writes them.

    Under FSDP/DeepSpeed the optimizer state is sharded; gathering it needs their own
    (pickle-based) checkpoint formats, which this project does not use, so no checkpoints there.
    """
    step = state["step"]
    if accelerator.is_main_process:
        checkpoint.begin(root, step)
    accelerator.wait_for_everyone()
    tmp = checkpoint.temp_dir(root, step)
    checkpoint.write_rank_files(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()  # every rank's RNG file is in before the main one finishes the folder
    if accelerator.is_main_process:
        checkpoint.write_main_files(tmp, accelerator.unwrap_model(model), optimizer, scheduler, state)
        checkpoint.commit(root, step, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
