"""The loop's injectable parts: an objective and a batch source of one's own run on the same loop.

A preference or reward objective brings batches whose *weight* is not target tokens (pairs,
sequences); the loop must divide each optimizer step by the step's total weight, log what the
objective returns, and call the callback, without a second loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import QA8
from specialize.batches import plan_epoch
from specialize.config import FinetuneConfig
from specialize.data.formats import load_examples
from specialize.data.templates import resolve_template
from specialize.data.tokenize import IGNORE, encode_examples, pad_token_id
from specialize.packing import Collator
from specialize.train import train


@dataclass
class SequenceBatch:
    """A padded batch whose loss is a sum of per-sequence mean losses: its weight is its sequences."""

    inner: object

    @property
    def weight(self) -> int:
        return self.inner.input_ids.shape[0]

    def to(self, device):
        return SequenceBatch(self.inner.to(device))


def per_sequence_loss(model, batch: SequenceBatch, only_targets: bool) -> torch.Tensor:
    inner = batch.inner
    logits = model(**inner.model_inputs(), use_cache=False).logits  # (B, T, V)
    losses = F.cross_entropy(logits.transpose(1, 2).float(), inner.targets, ignore_index=IGNORE, reduction="none")
    counts = (inner.targets != IGNORE).sum(dim=1).clamp(min=1)  # (B,)
    return (losses.sum(dim=1) / counts).sum()  # summed over sequences: the loop divides by the weight


class Sequences:
    """A batch source: the default plan, collated padded, wrapped as SequenceBatch."""

    def __init__(self, items, cfg, pad_id):
        self.items, self.cfg, self.collate = items, cfg, Collator(False, pad_id, 0.0)
        self.fingerprint = None  # unchecked on resume

    def steps_per_epoch(self, world: int) -> int:
        return len(plan_epoch(len(self.items), 0, self.cfg, world))

    def step(self, step: int, rank: int, world: int):
        epoch, index = divmod(step, self.steps_per_epoch(world))
        micro = plan_epoch(len(self.items), epoch, self.cfg, world)[index]
        return [SequenceBatch(self.collate([self.items[i] for i in m])) for m in micro[rank::world]]


def test_a_custom_objective_and_batch_source_train_on_the_one_loop(tmp_path, tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    examples = load_examples([str(QA8)])
    items = encode_examples(examples, tokenizer, resolve_template("auto", tokenizer, {e.shape for e in examples}),
                            512)[0]
    pad = pad_token_id(tokenizer)
    cfg = FinetuneConfig(max_steps=3, micro_batch_size=2, grad_accum_steps=2, learning_rate=1e-2, warmup_steps=0,
                         max_grad_norm=None, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    untouched = AutoModelForCausalLM.from_pretrained(tiny_llama)
    source = Sequences(items, cfg, pad)
    # The first step's expected loss: the mean over its 4 sequences of each one's mean token loss.
    with torch.no_grad():
        first = source.step(0, 0, 1)
        expected = sum(per_sequence_loss(untouched, b, False) for b in first) / sum(b.weight for b in first)
    rows = []
    trained, result = train(model, items, [], cfg, tmp_path, pad_id=pad, loss=per_sequence_loss, batches=source,
                            callback=lambda step, row: rows.append(row))
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert abs(rows[0]["loss"] - float(expected)) < 1e-5
    assert rows[0]["tokens"] == 4  # the weight units are sequences here, not tokens
    assert rows[-1]["loss"] < rows[0]["loss"]  # and it learns
    assert result.steps == 3 and not result.packed
