"""Packing is exact: the same loss as padded batches, and no example sees its neighbour.

Packing puts several examples in one row with restarting position_ids and no attention mask;
transformers 5 turns that into a block-diagonal causal mask. Architectures that ignore it
(OPT here) must be detected and trained padded instead.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig

from specialize.config import FinetuneConfig
from specialize.data.formats import load_examples
from specialize.data.templates import resolve_template
from specialize.data.tokenize import IGNORE, collate_packed, collate_padded, encode_examples, pad_token_id
from specialize.packing import collate_rows, packing_is_exact, plan_rows
from specialize.train import token_loss_sum, train
from helpers import QA8


def _items(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples([str(QA8)])
    template = resolve_template("auto", tokenizer, {e.shape for e in examples})
    return encode_examples(examples, tokenizer, template, 512)[0], tokenizer


def _model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()  # eval: GPT-2's dropout off


def _tiny_opt(vocab: int):
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, max_position_embeddings=512, dropout=0.0, pad_token_id=1)
    return AutoModelForCausalLM.from_config(config).eval()


def _mean_loss(model, batch, only_targets=False) -> float:
    with torch.no_grad():
        return float(token_loss_sum(model, batch, only_targets)) / batch.target_tokens


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_packed_loss_equals_padded_loss(arch, request):
    model_dir = request.getfixturevalue(arch)
    items, tokenizer = _items(model_dir)
    assert len({len(i.input_ids) for i in items}) > 4  # varied lengths, or padding proves nothing
    model = _model(model_dir)
    padded = _mean_loss(model, collate_padded(items, pad_token_id(tokenizer)))
    one_row = _mean_loss(model, collate_packed(items))
    rows = collate_rows(items, pad_token_id(tokenizer), attention_cost=1.0)  # forces several rows with tail padding
    assert rows.input_ids.shape[0] > 1 and (rows.targets == IGNORE).any()
    assert one_row == pytest.approx(padded, abs=1e-5)
    assert _mean_loss(model, rows) == pytest.approx(padded, abs=1e-5)
    # Projecting only the target positions to the vocabulary changes nothing.
    assert _mean_loss(model, collate_packed(items), only_targets=True) == pytest.approx(one_row, abs=1e-6)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_packed_example_never_sees_its_neighbour(arch, request):
    """Changing every token of one example leaves every other example's logits unchanged.

    Checked for the one-row layout (examples in order, so example 1 follows the changed
    example 0) and for several rows with tail padding.
    """
    model_dir = request.getfixturevalue(arch)
    items, tokenizer = _items(model_dir)
    model = _model(model_dir)
    changed = [type(items[0])([(t + 7) % len(tokenizer) for t in items[0].input_ids], items[0].labels)] + items[1:]
    layouts = [collate_packed, lambda xs: collate_rows(xs, pad_token_id(tokenizer), attention_cost=1.0)]
    for collate in layouts:
        before, after = collate(items), collate(changed)
        with torch.no_grad():
            logits_before = model(**before.model_inputs(), use_cache=False).logits  # (R, W, V)
            logits_after = model(**after.model_inputs(), use_cache=False).logits
        in_changed = before.input_ids != after.input_ids  # (R, W): the changed example's tokens
        assert in_changed.sum() == len(items[0].input_ids)
        assert (logits_before[in_changed] - logits_after[in_changed]).abs().max() > 1e-3
        assert torch.equal(logits_before[~in_changed], logits_after[~in_changed])


def test_packing_check_accepts_llama_and_gpt2_and_rejects_opt(tiny_llama, tiny_gpt2):
    items, tokenizer = _items(tiny_llama)
    assert packing_is_exact(_model(tiny_llama), items)
    assert packing_is_exact(_model(tiny_gpt2), items)
    # OPT derives positions from the attention mask and ignores position_ids: packing would mix examples.
    assert not packing_is_exact(_tiny_opt(len(tokenizer)), items)


def test_train_turns_packing_off_for_opt_and_matches_padded(tmp_path, tiny_llama):
    items, tokenizer = _items(tiny_llama)
    cfg = dict(out=tmp_path, max_steps=2, micro_batch_size=4, learning_rate=1e-3, progress=False, warmup_steps=0)
    results = {}
    for packing in (True, False):
        model = _tiny_opt(len(tokenizer)).train()
        trained, results[packing] = train(model, items, [], FinetuneConfig(packing=packing, **cfg), tmp_path / str(packing),
                                          pad_id=pad_token_id(tokenizer))
    assert results[True].packed is False and results[False].packed is False
    assert results[True].train_loss == results[False].train_loss
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert train(llama, items, [], FinetuneConfig(**cfg), tmp_path / "llama", pad_id=pad_token_id(tokenizer))[1].packed


def test_plan_rows_trades_padding_for_attention():
    lengths = [50, 40, 30, 30, 20, 10, 10, 5]
    one_row = plan_rows(lengths, attention_cost=0.0)
    assert one_row == [[0, 1, 2, 3, 4, 5, 6, 7]]  # no padding at all when long rows cost nothing extra
    rows = plan_rows(lengths, attention_cost=1.0)  # long rows expensive: rows as wide as the longest item
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert max(sum(lengths[i] for i in row) for row in rows) == 50
    assert len(rows) == 4
