"""The one training loop, shared by pre-training and fine-tuning, on accelerate.

Vocabulary: a *micro-step* is one forward/backward of `micro_batch_size` examples on one
process; an *optimizer step* is `grad_accum_steps` micro-steps on every process, then one
update. The loss of an optimizer step is the sum of token losses over all of its micro-steps
on all processes, divided by the number of target tokens in the whole step — not a mean of
micro-batch means, which would weigh a short answer's tokens more than a long one's.

Full fine-tuning vs LoRA is decided before this loop (model preparation), not in it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

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


def make_accelerator(precision: str) -> Accelerator:
    """bf16 autocast on GPUs that support it (precision=auto), fp32 on CPU."""
    mixed = "no"
    if precision in ("bf16", "fp16"):
        mixed = precision
    elif precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        mixed = "bf16"
    return Accelerator(mixed_precision=mixed)


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


def token_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Sum of cross-entropy over the batch's target tokens (a scalar)."""
    logits = model(**batch.model_inputs(), use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def _schedule(optimizer, cfg: TrainConfig, total_steps: int):
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(0.03 * total_steps)
    if cfg.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if cfg.lr_schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw_8bit needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    fused = cfg.optimizer == "adamw_fused" and torch.cuda.is_available()
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


def evaluate_loss(model, items: list[Encoded], cfg: TrainConfig, accelerator: Accelerator, pad_id: int) -> float:
    """Mean loss per target token over `items`, sharded across processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    shard = items[accelerator.process_index:: accelerator.num_processes]
    with torch.no_grad():
        for start in range(0, len(shard), cfg.micro_batch_size):
            chunk = shard[start: start + cfg.micro_batch_size]
            batch = (collate_packed(chunk) if cfg.packing else collate_padded(chunk, pad_id)).to(accelerator.device)
            with accelerator.autocast():
                total[0] += token_loss_sum(model, batch).double()
            total[1] += batch.target_tokens
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def train(model, train_items: list[Encoded], eval_items: list[Encoded], cfg: TrainConfig, out: Path, *,
          pad_id: int, accelerator: Accelerator | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> tuple[torch.nn.Module, TrainResult]:
    """Train `model` in place; returns the unwrapped model and a summary.

    Writes `out/metrics.jsonl` and `out/checkpoints/step-N/`; resumes from the newest complete
    checkpoint when `cfg.resume`.
    """
    accelerator = accelerator or make_accelerator(cfg.precision)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(plan_epoch(len(train_items), 0, cfg, world))
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_items)} examples make no optimizer step with {world} processes")
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = _schedule(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.compile:
        model = torch.compile(model)

    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    metrics = MetricsLog(out / "metrics.jsonl", main)
    fingerprint = data_fingerprint(train_items)
    start_step, tokens_done, elapsed_before = 0, 0, 0.0
    if cfg.resume and (found := checkpoint.latest(ckpt_root)) is not None:
        state = checkpoint.load(found, accelerator.unwrap_model(model), optimizer, scheduler, rank)
        if state["data_fingerprint"] != fingerprint:
            raise UserError(f"cannot resume from {found}: the training data or its tokenisation changed")
        start_step, tokens_done, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        accelerator.print(f"resuming from {found} (step {start_step}/{total_steps})")
    elif main and not cfg.resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or steps_per_epoch
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
            micro_batches = plan[index]
            batches = [[train_items[i] for i in mb] for mb in micro_batches[rank::world]]
            collated = [collate_packed(b) if cfg.packing else collate_padded(b, pad_id) for b in batches]
            # The step's target tokens over every process: the one denominator of this step's loss.
            local_tokens = sum(b.target_tokens for b in collated)
            step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=device), reduction="sum"))
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, batch in enumerate(collated):
                batch = batch.to(device)
                sync = i == len(collated) - 1
                context = accelerator.no_sync(model) if not sync and world > 1 else nullcontext()
                with context, accelerator.autocast():
                    summed = token_loss_sum(model, batch)
                    # DDP averages gradients over processes; scaling by `world` turns that into a sum.
                    accelerator.backward(summed * world / max(step_tokens, 1))
                loss_sum += summed.detach().double()
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            last_loss = float(accelerator.reduce(loss_sum, reduction="sum")) / max(step_tokens, 1)
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
                eval_loss = evaluate_loss(model, eval_items, cfg, accelerator, pad_id)
                metrics.write({"step": done, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
            if done % save_every == 0 and done < total_steps:
                _save_checkpoint(accelerator, model, optimizer, scheduler, ckpt_root, cfg, {
                    "step": done, "tokens": tokens_done, "data_fingerprint": fingerprint,
                    "elapsed_s": elapsed_before + time.perf_counter() - started})

    accelerator.wait_for_everyone()
    seconds = elapsed_before + time.perf_counter() - started
    result = TrainResult(total_steps, tokens_done, seconds, last_loss, eval_loss)
    return accelerator.unwrap_model(model), result


def _save_checkpoint(accelerator, model, optimizer, scheduler, root: Path, cfg: TrainConfig, state: dict) -> None:
    step = state["step"]
    if accelerator.is_main_process:
        checkpoint.begin(root, step)
    accelerator.wait_for_everyone()
    tmp = checkpoint.temp_dir(root, step)
    checkpoint.write_rank_files(tmp, accelerator.process_index)
    if accelerator.is_main_process:
        checkpoint.write_main_files(tmp, accelerator.unwrap_model(model), optimizer, scheduler, state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.commit(root, step, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
