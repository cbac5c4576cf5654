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
  run by `packing.packing_is_exact`, else padded batches are used);
- rows are laid out by `packing.plan_rows` to trade tail padding against attention over long rows;
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
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from specialize import checkpoint
from specialize.config import TrainConfig
from specialize.data.tokenize import IGNORE, Batch, Encoded
from specialize.errors import UserError
from specialize.optim import make_optimizer, make_schedule
from specialize.packing import Collator, attention_cost, packing_is_exact


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


# ---------------------------------------------------------------------------------------------
# Loss, metrics, evaluation.


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
        own = [_blank(collate(items[:1]))]
    batches = _even_share(own, math.ceil(len(items) / world / size) * world, world)
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


def _even_share(batches: list[Batch], n_batches: int, world: int) -> list[Batch]:
    """This process's micro-batches, topped up to ceil(n_batches / world) with target-free copies.

    When a step's micro-batches do not divide evenly between processes, the processes with one
    fewer run one more forward and backward on a copy whose targets are all ignored: it adds
    exactly zero to loss and gradients, but under FSDP and DeepSpeed ZeRO-3, where every forward
    gathers parameters from all processes, nobody waits for a forward that never comes.
    """
    if world == 1 or not batches:
        return batches
    return batches + [_blank(batches[-1])] * (math.ceil(n_batches / world) - len(batches))


def _blank(batch: Batch) -> Batch:
    return replace(batch, targets=torch.full_like(batch.targets, IGNORE))


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
    scheduler = make_schedule(optimizer, cfg, total_steps)
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
    elif main and not cfg.resume:
        # A fresh run into a used folder: an earlier run's checkpoints would outrank this run's
        # in pruning and in a later --resume, and its metrics would mix with these.
        if checkpoint.latest(ckpt_root) is not None or (out / "metrics.jsonl").exists():
            accelerator.print(f"starting afresh in {out}: the earlier run's checkpoints and metrics there are "
                              "removed (--resume continues a run instead)")
        shutil.rmtree(ckpt_root, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)

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
            collated = _even_share([collate([train_items[i] for i in mb]) for mb in plan[index][rank::world]],
                                   len(plan[index]), world)
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
