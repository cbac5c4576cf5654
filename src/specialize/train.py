"""The one training loop, shared by pre-training and fine-tuning, on accelerate.

Vocabulary: a *micro-step* is one forward/backward of `micro_batch_size` examples on one
process; an *optimizer step* is `grad_accum_steps` micro-steps on every process, then one
update. The loss of an optimizer step is the sum of token losses over all of its micro-steps
on all processes, divided by the number of target tokens in the whole step — not a mean of
micro-batch means, which would weigh a short answer's tokens more than a long one's.

The loop's parts are injectable, as in mlx-lm's trainer: the objective (`loss`), where the
micro-batches come from (`batches`, see batches.py) and what happens after each logged step
(`callback`), so a preference or reward objective runs on this same loop. Inside, one run is
`_start` (prepare, resume), then per step `_optimizer_step` and `_after_step` (log, eval, checkpoint).

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

import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from specialize import checkpoint, defaults
from specialize.batches import BatchSource, PlannedBatches, batch_weight, blank, even_share, plan_epoch  # noqa: F401
from specialize.config import TrainConfig
from specialize.data.tokenize import Encoded
from specialize.errors import Stopped, UserError
from specialize.loss import accepts_logits_to_keep, evaluate_loss, token_loss_sum  # noqa: F401 (re-exported)
from specialize.optim import make_optimizer, make_schedule
from specialize.packing import Collator, attention_cost, packing_is_exact
from specialize.preemption import StopSignals
from specialize.progress import progress_bar
from specialize.rundir import MetricsLog
from specialize.tracking import Trackers, accelerator_kwargs


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


def make_accelerator(precision: str, report_to: Sequence[str] = (), run_dir: Path | None = None) -> Accelerator:
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
    return Accelerator(mixed_precision=mixed, cpu=launched and not torch.cuda.is_available() and not xpu,
                       **accelerator_kwargs(report_to, run_dir))


def is_sharded(accelerator: Accelerator) -> bool:
    """FSDP and DeepSpeed hold parameters (and optimizer state) in shards across processes."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


# ---------------------------------------------------------------------------------------------
# The loop.


LossFn = Callable[[torch.nn.Module, Any, bool], torch.Tensor]
"""(model, batch, only_targets) -> the batch's loss summed over its weight units (`batches.batch_weight`)."""
Callback = Callable[[int, dict], dict | None]
"""(optimizer step, the metrics row just logged) -> extra metrics to log for that step, or None;
called on the main process after each logged step."""


@dataclass
class _Loop:
    """What one run of the loop carries from step to step."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    batches: BatchSource
    cfg: TrainConfig
    out: Path
    steps_per_epoch: int
    total_steps: int
    examples_per_step: int
    only_targets: bool
    packed: bool
    collate: Collator | None
    metrics: MetricsLog
    trackers: Trackers
    start_step: int = 0
    tokens_done: int = 0  # weight units trained on (target tokens for SFT and pre-training)
    elapsed_before: float = 0.0  # seconds of the run before a resume
    started: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    last_loss: float | None = None
    eval_loss: float | None = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def train(model, train_items: list[Encoded], eval_items: list[Encoded], cfg: TrainConfig, out: Path, *,
          pad_id: int, accelerator: Accelerator | None = None, on_step: Callback | None = None,
          loss: LossFn = token_loss_sum, batches: BatchSource | None = None,
          callback: Callback | None = None) -> tuple[torch.nn.Module, TrainResult]:
    """Train `model` in place; returns the unwrapped model and a summary.

    Args:
        train_items, eval_items: encoded examples; the default batch source plans and collates
            `train_items`, and the eval loss is measured on `eval_items` (none: no eval).
        out: the run folder, prepared by its caller (`RunDir.start`): metrics.jsonl and
            checkpoints/step-N/ are written there; `cfg.resume` continues from its newest checkpoint.
        loss: the objective, summed over a batch's weight units (default: next-token cross-entropy
            over target tokens); a preference or reward objective brings it with its own `batches`.
        callback: called with (step, metrics row) after every logged step (`on_step`: its old name).

    Under FSDP/DeepSpeed, `result.full_state_dict` holds the gathered weights to save.
    """
    loop = _start(model, train_items, cfg, Path(out), pad_id, accelerator, batches)
    callback = callback or on_step
    with StopSignals() as signals, progress_bar(cfg.progress and loop.accelerator.is_main_process, info=True) as bar, \
            loop.trackers:
        task = bar.add_task("train", total=loop.total_steps, completed=loop.start_step, info="")
        for step in range(loop.start_step, loop.total_steps):
            loss_value, grad_norm, weight = _optimizer_step(loop, step, loss)
            _after_step(loop, step + 1, loss_value, grad_norm, weight, eval_items, pad_id, callback)
            rate = loop.window_tokens / max(time.perf_counter() - loop.window_start, 1e-9)
            bar.update(task, completed=step + 1, info=f"loss {loop.last_loss:.4f}  {rate:,.0f} tok/s")
            if step + 1 < loop.total_steps and (signum := signals.agreed(loop.accelerator)) is not None:
                _stop(loop, step + 1, signum)

    accelerator = loop.accelerator
    accelerator.wait_for_everyone()
    result = TrainResult(loop.total_steps, loop.tokens_done, loop.elapsed(), loop.last_loss, loop.eval_loss,
                         loop.packed)
    if is_sharded(accelerator):
        # Every process takes part in gathering; the main process gets the full weights.
        result.full_state_dict = accelerator.get_state_dict(loop.model)
    return accelerator.unwrap_model(loop.model), result


def _start(model, train_items: list[Encoded], cfg: TrainConfig, out: Path, pad_id: int,
           accelerator: Accelerator | None, batches: BatchSource | None) -> _Loop:
    """Prepare model and optimizer, pick the batch source, and resume from a checkpoint if asked."""
    accelerator = accelerator or make_accelerator(cfg.precision, cfg.report_to, out)
    world, sharded = accelerator.num_processes, is_sharded(accelerator)
    if cfg.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    model.train()
    cost = attention_cost(model)
    only_targets = accepts_logits_to_keep(model)
    if cfg.learning_rate is None:  # finetune resolves it; a direct caller gets the same default
        trainable, total = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                            sum(p.numel() for p in model.parameters()))
        chosen = defaults.learning_rate("full" if trainable == total else "lora", total)
        cfg = cfg.model_copy(update={"learning_rate": chosen.value})
    optimizer = make_optimizer(model, cfg)
    collate = None
    if batches is None:  # placeholder until packing is checked on the prepared model, below
        batches = PlannedBatches(train_items, cfg, collate=lambda items: None)
    steps_per_epoch = batches.steps_per_epoch(world)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_items)} examples make no optimizer step with {world} processes")
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = make_schedule(optimizer, cfg, total_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # There is no DataLoader to infer it from; "auto" would make prepare() fail.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    model, optimizer = accelerator.prepare(model, optimizer)

    packed = False
    if isinstance(batches, PlannedBatches):
        packed = cfg.packing and packing_is_exact(model, train_items, accelerator.unwrap_model(model))
        if cfg.packing and not packed:
            accelerator.print(f"packing is off: {type(accelerator.unwrap_model(model)).__name__} does not keep "
                              "packed examples apart (it ignores restarting position_ids); using padded batches")
        collate = batches.collate = Collator(packed, pad_id, cost)
    if cfg.compile:
        # In place (nn.Module.compile): no wrapper, so unwrapping, checkpoints and no_sync see the same module.
        model.compile()

    out.mkdir(parents=True, exist_ok=True)
    loop = _Loop(accelerator, model, optimizer, scheduler, batches, cfg, out, steps_per_epoch, total_steps,
                 cfg.micro_batch_size * cfg.grad_accum_steps * world, only_targets, packed, collate,
                 MetricsLog(out / "metrics.jsonl", accelerator.is_main_process),
                 Trackers(accelerator, cfg, out, "specialize"))
    # Dropout draws from here on: seeded per process, and restored from the checkpoint on resume.
    set_seed(cfg.seed + accelerator.process_index)
    if sharded and cfg.save_every:
        warnings.warn("checkpoints are not written under FSDP/DeepSpeed (no exact resume there yet); "
                      "only the final model is saved", stacklevel=3)
    if cfg.resume:
        try:
            _resume(loop, sharded)
        except BaseException:
            loop.trackers.finish()  # a refused resume must not leave a tracker run open
            raise
    return loop


def _resume(loop: _Loop, sharded: bool) -> None:
    """Continue from the newest complete checkpoint (weights, optimizer, schedule, RNG, data position)."""
    if sharded:
        raise UserError("--resume is not supported under FSDP/DeepSpeed yet (checkpoints are not written there); "
                        "resume with DDP or one process")
    accelerator = loop.accelerator
    found = checkpoint.latest(loop.out / "checkpoints")
    if found is None:  # stopped before its first checkpoint: it starts over, and so do its metrics
        loop.metrics.truncate_after(0)
        return
    state = checkpoint.load(found, accelerator.unwrap_model(loop.model), loop.optimizer, loop.scheduler,
                            accelerator.process_index)
    if loop.batches.fingerprint is not None and state["data_fingerprint"] != loop.batches.fingerprint:
        raise UserError(f"cannot resume from {found}: the training data or its tokenisation changed")
    if state.get("examples_per_step", loop.examples_per_step) != loop.examples_per_step:
        raise UserError(f"cannot resume from {found}: it was trained with {state['examples_per_step']} examples per "
                        f"optimizer step, this run has {loop.examples_per_step} (micro_batch_size x grad_accum_steps "
                        "x processes must stay the same, or the data position would be wrong)")
    loop.start_step, loop.tokens_done, loop.elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
    loop.metrics.truncate_after(loop.start_step)
    accelerator.print(f"resuming from {found} (step {loop.start_step}/{loop.total_steps})")


def _optimizer_step(loop: _Loop, step: int, loss: LossFn) -> tuple[float, float | None, int]:
    """One optimizer step: every micro-batch forward and backward, clip, update.

    Returns (loss per weight unit, gradient norm before clipping, the step's weight over all processes).
    """
    accelerator, model, device = loop.accelerator, loop.model, loop.accelerator.device
    world = accelerator.num_processes
    micro_batches = loop.batches.step(step, accelerator.process_index, world)
    # The step's weight (target tokens) over every process: the one denominator of this step's loss.
    weight = sum(batch_weight(b) for b in micro_batches)
    if world > 1:
        weight = int(accelerator.reduce(torch.tensor(weight, device=device), reduction="sum"))
    # DDP and FSDP average gradients over processes; scaling by `world` turns that into a sum.
    scale = world / max(weight, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        # DeepSpeed steps inside backward at the accumulation boundary; this tells it where that is.
        accelerator.sync_gradients = sync
        context = accelerator.no_sync(model) if not sync and world > 1 else nullcontext()
        with context, accelerator.autocast():
            summed = loss(model, batch.to(device), loop.only_targets)
            accelerator.backward(summed * scale)
        loss_sum += summed.detach()
    grad_norm = None
    if loop.cfg.max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), loop.cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()  # FSDP2 returns a replicated DTensor
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    # One device-to-host copy per step for both numbers.
    stats = torch.stack([loss_sum, torch.as_tensor(grad_norm if grad_norm is not None else float("nan"),
                                                   dtype=torch.float64, device=device)]).tolist()
    return stats[0] / max(weight, 1), None if math.isnan(stats[1]) else stats[1], weight


def _after_step(loop: _Loop, done: int, loss_value: float, grad_norm: float | None, weight: int,
                eval_items: list[Encoded], pad_id: int, callback: Callback | None) -> None:
    """Log the step, run the eval loss and write a checkpoint when they are due."""
    cfg, accelerator = loop.cfg, loop.accelerator
    loop.last_loss = loss_value
    loop.tokens_done += weight
    loop.window_tokens += weight
    if done % cfg.log_every == 0 or done == loop.total_steps:
        rate = loop.window_tokens / max(time.perf_counter() - loop.window_start, 1e-9)
        row = {"step": done, "epoch": round(done / loop.steps_per_epoch, 4), "loss": loss_value,
               "lr": loop.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": loop.tokens_done,
               "tokens_per_s": rate, "elapsed_s": loop.elapsed()}
        loop.metrics.write(row)
        loop.trackers.log(row, done)
        if callback and accelerator.is_main_process:
            extra = callback(done, row)
            if extra:  # an objective's own metrics (reward margins): a row of their own, trackers too
                loop.metrics.write({"step": done} | extra)
                loop.trackers.log(extra, done)
        loop.window_tokens, loop.window_start = 0, time.perf_counter()
    eval_every = cfg.eval_every or loop.steps_per_epoch
    if eval_items and (done % eval_every == 0 or done == loop.total_steps):
        loop.eval_loss = evaluate_loss(loop.model, eval_items, cfg, accelerator, pad_id, loop.collate,
                                       loop.only_targets)
        row = {"step": done, "eval_loss": loop.eval_loss, "eval_ppl": math.exp(min(loop.eval_loss, 50))}
        loop.metrics.write(row)
        loop.trackers.log(row, done)
    save_every = cfg.save_every or loop.steps_per_epoch
    if done % save_every == 0 and done < loop.total_steps and not is_sharded(accelerator):
        _save_checkpoint(accelerator, loop.model, loop.optimizer, loop.scheduler, loop.out / "checkpoints", cfg,
                         _checkpoint_state(loop, done))


def _stop(loop: _Loop, done: int, signum: int) -> None:
    """A stop signal arrived: checkpoint this step (unless it just was) and raise `Stopped`."""
    accelerator, root = loop.accelerator, loop.out / "checkpoints"
    name = signal.Signals(signum).name
    if is_sharded(accelerator):
        raise Stopped(f"stopped by {name} at step {done}/{loop.total_steps}; no checkpoint under FSDP/DeepSpeed, "
                      "so a new run starts from the beginning", signum)
    if checkpoint.latest(root) is None or checkpoint.latest(root).name != f"step-{done}":
        _save_checkpoint(accelerator, loop.model, loop.optimizer, loop.scheduler, root, loop.cfg,
                         _checkpoint_state(loop, done))
    raise Stopped(f"stopped by {name} at step {done}/{loop.total_steps}: checkpoint {root / f'step-{done}'} "
                  "written; continue with the same command and --resume", signum)


def _checkpoint_state(loop: _Loop, done: int) -> dict:
    epoch, index = divmod(done - 1, loop.steps_per_epoch)
    return {"step": done, "epoch": epoch, "index_in_epoch": index + 1, "tokens": loop.tokens_done,
            "examples_per_step": loop.examples_per_step, "data_fingerprint": loop.batches.fingerprint,
            "elapsed_s": loop.elapsed()}


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
