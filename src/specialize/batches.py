"""Where an optimizer step's micro-batches come from: the training loop's batch source.

The loop (`train.train`) asks a `BatchSource` for this process's micro-batches of optimizer
step N and never looks inside them beyond two things: `batch.to(device)`, and the batch's
*weight*, the units its loss is a sum over (target tokens for next-token prediction; pairs
for a preference objective). The step's loss is the sum over all its micro-batches on all
processes divided by the step's total weight, so a short answer's tokens weigh the same as
a long one's, whatever the micro-batch size.

`PlannedBatches`, the default source, serves SFT and pre-training: a seeded order per epoch
(`plan_epoch`), collated into padded or packed rows (`packing.Collator`). A preference or
reward objective brings its own source with the same two methods.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch

from specialize.config import TrainConfig
from specialize.data.tokenize import IGNORE, Batch, Encoded


class BatchSource(Protocol):
    """What the loop needs of a batch source."""

    fingerprint: str | None  # identifies the data, so --resume refuses a changed data set (None: unchecked)

    def steps_per_epoch(self, world: int) -> int:
        """Optimizer steps in one pass over the data with `world` processes."""

    def step(self, step: int, rank: int, world: int) -> Sequence[Any]:
        """Process `rank`'s micro-batches of optimizer step `step` (0-based, counted across epochs)."""


def batch_weight(batch: Any) -> int:
    """The units a batch's loss is summed over: `batch.weight`, else its target tokens."""
    weight = getattr(batch, "weight", None)
    return int(weight) if weight is not None else int(batch.target_tokens)


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


def data_fingerprint(items: Sequence[Encoded]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item.input_ids).encode())
    return digest.hexdigest()[:16]


def even_share(batches: list[Batch], n_batches: int, world: int) -> list[Batch]:
    """This process's micro-batches, topped up to ceil(n_batches / world) with target-free copies.

    When a step's micro-batches do not divide evenly between processes, the processes with one
    fewer run one more forward and backward on a copy whose targets are all ignored: it adds
    exactly zero to loss and gradients, but under FSDP and DeepSpeed ZeRO-3, where every forward
    gathers parameters from all processes, nobody waits for a forward that never comes.
    """
    if world == 1 or not batches:
        return batches
    return batches + [blank(batches[-1])] * (math.ceil(n_batches / world) - len(batches))


def blank(batch: Batch) -> Batch:
    """The same rows with every target ignored: zero loss, zero gradient, same collectives."""
    return replace(batch, targets=torch.full_like(batch.targets, IGNORE))


class PlannedBatches:
    """The default source: `items` in a seeded order per epoch, collated by `collate`."""

    def __init__(self, items: Sequence[Encoded], cfg: TrainConfig, collate: Callable[[list[Encoded]], Batch], *,
                 fingerprint: str | None = None):
        """`fingerprint`: a digest of the data known already (pre-training's shards carry one), which
        saves hashing every item's ids again."""
        self.items, self.cfg, self.collate = items, cfg, collate
        self.fingerprint: str | None = fingerprint or data_fingerprint(items)
        self._plan: tuple[int, int, list[list[list[int]]]] | None = None  # (epoch, world, plan)
        self._steps: dict[int, int] = {}  # world -> steps per epoch (the same for every epoch)

    def steps_per_epoch(self, world: int) -> int:
        if world not in self._steps:
            self._steps[world] = len(plan_epoch(len(self.items), 0, self.cfg, world))
        return self._steps[world]

    def _epoch_plan(self, epoch: int, world: int) -> list[list[list[int]]]:
        if self._plan is None or self._plan[:2] != (epoch, world):
            self._plan = (epoch, world, plan_epoch(len(self.items), epoch, self.cfg, world))
        return self._plan[2]

    def step(self, step: int, rank: int, world: int) -> list[Batch]:
        epoch, index = divmod(step, self.steps_per_epoch(world))
        micro = self._epoch_plan(epoch, world)[index]
        own = [self.collate([self.items[i] for i in indices]) for indices in micro[rank::world]]
        return even_share(own, len(micro), world)
