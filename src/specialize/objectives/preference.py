"""Preference tuning on the one training loop: a batch source, the objective, the reference model.

The loop (`train.train`) takes `batches=PreferenceBatches(...)` and `loss=PreferenceLoss(...)`.
A batch's *weight* is its examples (pairs for DPO/ORPO, rows for KTO), so each optimizer step's
loss is the mean over its examples, whatever the micro-batch size and process count.

The reference model is never a second copy in memory:
- LoRA: the same model with its adapters disabled (`peft`'s `disable_adapter()`), no gradient;
- full training: every answer's reference log-probs are computed in one pass before training
  (`compute_reference`), kept with the items and saved as `reference_logps.safetensors` in the
  run, so `--resume` reuses them instead of asking the half-trained model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from specialize.batches import plan_epoch
from specialize.config import FinetuneConfig
from specialize.data.preference import PreferenceItem
from specialize.data.tokenize import IGNORE, Batch, collate_padded
from specialize.errors import UserError
from specialize.objectives import losses

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class PreferenceBatch:
    """Rows [chosen_1..chosen_n, rejected_1..rejected_n] (pairs) or [completion_1..n] (KTO), padded."""

    sequences: Batch
    n: int  # examples (pairs or KTO rows)
    desirable: torch.Tensor | None = None  # (n,) bool, KTO
    mismatched: Batch | None = None  # KTO: rows with a prompt and another row's completion
    mismatched_rows: torch.Tensor | None = None  # (m,) which examples have a mismatched row
    reference: torch.Tensor | None = None  # (n, 2) precomputed: (chosen, rejected) or (completion, mismatched)
    active: bool = True  # False: a copy that only keeps other processes company (loss x 0)

    @property
    def weight(self) -> int:
        return self.n if self.active else 0

    def to(self, device) -> PreferenceBatch:
        move = (lambda t: None if t is None else t.to(device))
        return PreferenceBatch(self.sequences.to(device), self.n, move(self.desirable),
                               None if self.mismatched is None else self.mismatched.to(device),
                               move(self.mismatched_rows), move(self.reference), self.active)


def collate_preferences(items: list[PreferenceItem], pad_id: int) -> PreferenceBatch:
    pairs = items[0].rejected is not None
    rows = [i.chosen for i in items] + ([i.rejected for i in items] if pairs else [])
    batch = PreferenceBatch(collate_padded(rows, pad_id), len(items))
    if all(i.reference is not None for i in items):
        batch.reference = torch.tensor([i.reference for i in items], dtype=torch.float32)  # (n, 2)
    if not pairs:
        batch.desirable = torch.tensor([i.desirable for i in items])
        with_kl = [k for k, i in enumerate(items) if i.mismatched is not None]
        if with_kl:
            batch.mismatched = collate_padded([items[k].mismatched for k in with_kl], pad_id)
            batch.mismatched_rows = torch.tensor(with_kl)
    return batch


def fingerprint(items: list[PreferenceItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        for seq in (item.chosen, item.rejected, item.mismatched):
            digest.update(json.dumps(None if seq is None else [seq.input_ids, seq.labels]).encode())
        digest.update(b"1" if item.desirable else b"0")
    return digest.hexdigest()[:16]


class PreferenceBatches:
    """The loop's batch source for preference items: the same seeded plan as SFT (`plan_epoch`)."""

    def __init__(self, items: list[PreferenceItem], cfg: FinetuneConfig, pad_id: int):
        self.items, self.cfg, self.pad_id = items, cfg, pad_id
        self.fingerprint: str | None = fingerprint(items)

    def steps_per_epoch(self, world: int) -> int:
        return len(plan_epoch(len(self.items), 0, self.cfg, world))

    def step(self, step: int, rank: int, world: int) -> list[PreferenceBatch]:
        epoch, index = divmod(step, self.steps_per_epoch(world))
        micro = plan_epoch(len(self.items), epoch, self.cfg, world)[index]
        own = [collate_preferences([self.items[i] for i in indices], self.pad_id) for indices in micro[rank::world]]
        # Processes with one micro-batch fewer run a copy at weight 0, so nobody waits on a collective.
        while world > 1 and own and len(own) < math.ceil(len(micro) / world):
            copy = collate_preferences([self.items[i] for i in micro[rank::world][-1]], self.pad_id)
            copy.active = False
            own.append(copy)
        return own


def sequence_logps(model, batch: Batch, only_targets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its target tokens (B,) and their count (B,)."""
    keep = batch.targets != IGNORE  # (B, T)
    extra = {"logits_to_keep": keep} if only_targets else {}
    logits = model(**batch.model_inputs(), use_cache=False, **extra).logits
    if logits.ndim == 3:
        logits = logits[keep]  # (N, V)
    token_logps = -F.cross_entropy(logits.float(), batch.targets[keep], reduction="none")  # (N,)
    rows = keep.nonzero()[:, 0]  # the row of each kept token, in the same (row-major) order
    summed = torch.zeros(keep.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return summed.index_add(0, rows, token_logps), keep.sum(dim=1)


def _adapters_off(model):
    """The PEFT model inside an accelerate/DDP wrapper, or None for a model without adapters."""
    inner = getattr(model, "module", model)
    return inner if hasattr(inner, "disable_adapter") else None


class PreferenceLoss:
    """The loop's `loss` for dpo (sigmoid, ipo), orpo and kto: summed over a batch's examples.

    It also keeps TRL's reward statistics (β x log-ratio per answer) since the last logged step,
    which `row()` returns for metrics.jsonl.
    """

    def __init__(self, objective: str, beta: float, dpo_loss: str = "sigmoid", sft_weight: float = 0.0):
        self.objective, self.beta, self.dpo_loss, self.sft_weight = objective, beta, dpo_loss, sft_weight
        # sums and counts: chosen, rejected, margin, correct pairs, pairs, kl
        self._stats = torch.zeros(9, dtype=torch.float64)

    def _reference(self, model, batch: Batch, only_targets: bool) -> torch.Tensor:
        peft = _adapters_off(model)
        if peft is None:
            raise UserError("no reference log-probs: full training computes them before the loop "
                            "(objectives.preference.compute_reference)")
        with torch.no_grad(), peft.disable_adapter():
            return sequence_logps(model, batch, only_targets)[0]

    def __call__(self, model, batch: PreferenceBatch, only_targets: bool = False) -> torch.Tensor:
        self._counting = batch.active  # a target-free copy (a process with one micro-batch fewer) is not counted
        logps, tokens = sequence_logps(model, batch.sequences, only_targets)
        n, beta = batch.n, self.beta
        if self.objective == "orpo":
            chosen, rejected = logps[:n], logps[n:]
            per_example = losses.orpo(chosen, rejected, tokens[:n], tokens[n:], beta)
            # TRL's ORPO rewards: β x mean token log-prob of each answer.
            self._record(beta * chosen.detach() / tokens[:n].clamp(min=1),
                         beta * rejected.detach() / tokens[n:].clamp(min=1))
        elif self.objective == "dpo":
            if batch.reference is not None:
                ref_chosen, ref_rejected = batch.reference[:, 0], batch.reference[:, 1]
            else:
                ref = self._reference(model, batch.sequences, only_targets)
                ref_chosen, ref_rejected = ref[:n], ref[n:]
            chosen, rejected = logps[:n], logps[n:]
            if self.dpo_loss == "ipo":
                per_example = losses.ipo(chosen, rejected, ref_chosen, ref_rejected, beta, tokens[:n], tokens[n:])
            else:
                per_example = losses.dpo_sigmoid(chosen, rejected, ref_chosen, ref_rejected, beta)
            if self.sft_weight:  # TRL weighs each loss type's batch mean: n x the scalar, summed like the rest
                per_example = per_example + self.sft_weight * losses.chosen_nll(chosen, tokens[:n])
            self._record(beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach())
        else:
            per_example = self._kto(model, batch, logps, only_targets)
        summed = per_example.sum()
        return summed if batch.active else summed * 0.0

    def _kto(self, model, batch: PreferenceBatch, logps: torch.Tensor, only_targets: bool) -> torch.Tensor:
        if batch.reference is not None:
            reference = batch.reference[:, 0]
            ref_mismatched = batch.reference[batch.mismatched_rows, 1] if batch.mismatched is not None else None
        else:
            reference = self._reference(model, batch.sequences, only_targets)
            ref_mismatched = (self._reference(model, batch.mismatched, only_targets)
                              if batch.mismatched is not None else None)
        kl = torch.zeros((), device=logps.device)
        if batch.mismatched is not None:
            with torch.no_grad():  # z0 carries no gradient (TRL computes it without one)
                policy_mismatched = sequence_logps(model, batch.mismatched, only_targets)[0]
            kl = losses.kl_estimate(policy_mismatched, ref_mismatched)
        rewards = self.beta * (logps - reference).detach()
        desirable = batch.desirable
        # Unpaired: chosen = desirable rows, rejected = undesirable rows; no per-pair accuracy.
        self._record(rewards[desirable], rewards[~desirable], paired=False, kl=kl)
        return losses.kto(logps, reference, desirable, kl, self.beta)

    def _record(self, chosen: torch.Tensor, rejected: torch.Tensor, paired: bool = True,
                kl: torch.Tensor | None = None) -> None:
        if not getattr(self, "_counting", True):
            return
        chosen, rejected = chosen.detach().double().cpu(), rejected.detach().double().cpu()
        stats = [chosen.sum(), len(chosen), rejected.sum(), len(rejected), 0.0, 0.0, 0, 0.0, 0]
        if paired:
            stats[4:7] = [(chosen - rejected).sum(), (chosen > rejected).sum(), len(chosen)]
        if kl is not None:
            stats[7:9] = [float(kl), 1]
        self._stats += torch.tensor([float(x) for x in stats], dtype=torch.float64)

    def row(self) -> dict[str, float]:
        """Reward means since the last call (then reset), over this process's micro-batches.

        Pairs: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (the share of
        pairs whose chosen reward is higher), as TRL logs them. KTO: rewards/desirable,
        rewards/undesirable and kl (the mean z0).
        """
        chosen, n_chosen, rejected, n_rejected, margin, correct, pairs, kl, n_kl = self._stats.tolist()
        self._stats.zero_()
        out = {}
        names = ("rewards/desirable", "rewards/undesirable") if self.objective == "kto" else \
                ("rewards/chosen", "rewards/rejected")
        if n_chosen:
            out[names[0]] = chosen / n_chosen
        if n_rejected:
            out[names[1]] = rejected / n_rejected
        if pairs:
            out |= {"rewards/margins": margin / pairs, "rewards/accuracies": correct / pairs}
        if n_kl:
            out["kl"] = kl / n_kl
        return out


# ---------------------------------------------------------------------------------------------
# Reference log-probs computed ahead of training (full fine-tuning).


def compute_reference(model, items: list[PreferenceItem], pad_id: int, micro_batch_size: int, device,
                      progress=None) -> None:
    """Fill `item.reference` with the model's log-probs, before training (no gradient, eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), micro_batch_size):
            chunk = items[start: start + micro_batch_size]
            first = [i.chosen for i in chunk]
            second = [i.rejected if i.rejected is not None else i.mismatched for i in chunk]
            rows = first + [s for s in second if s is not None]
            logps = sequence_logps(model, collate_padded(rows, pad_id).to(device), False)[0].double().cpu()
            later = iter(logps[len(chunk):].tolist())
            for item, value, other in zip(chunk, logps[:len(chunk)].tolist(), second):
                item.reference = (value, next(later) if other is not None else math.nan)
            if progress:
                progress(len(chunk))
    model.train(was_training)


def save_reference(items: list[PreferenceItem], path: Path) -> None:
    """The reference log-probs, with the data fingerprint they belong to (safetensors)."""
    values = torch.tensor([item.reference for item in items], dtype=torch.float64)  # (N, 2)
    tmp = path.with_suffix(".tmp")
    save_file({"reference": values.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint(items)})
    tmp.replace(path)


def load_reference(items: list[PreferenceItem], path: Path) -> bool:
    """Put saved reference log-probs back on `items`; False when the file is missing or for other data."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint(items):
            return False
    values = load_file(str(path))["reference"]
    if values.shape[0] != len(items):
        return False
    for item, (first, second) in zip(items, values.tolist()):
        item.reference = (first, second)
    return True
