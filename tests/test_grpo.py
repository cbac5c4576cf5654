"""GRPO (`--objective grpo`) and the rewards it shares with `specialize pairs`: the loss equals TRL
1.16's own on a fixed batch, the loop normalises it per completion token ("dapo"), and a tiny model
rewarded for one answer learns to give it."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from helpers import write_jsonl

from specialize.config import FinetuneConfig
from specialize.data.tokenize import Encoded, collate_padded
from specialize.errors import UserError
from specialize.objectives import losses
from specialize.objectives.grpo import GRPOBatch, GRPOLoss
from specialize.objectives.rewards import Rewards, Sample, length_closeness

# Two groups of three completions, padded to 4 tokens; row 2 has one token, row 4 three.
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.9])
LOGPS = -torch.tensor([[0.5, 1.0, 0.2, 2.0], [0.1, 0.3, 0, 0], [1.5, 0, 0, 0], [0.7, 0.4, 0.9, 1.1],
                       [0.2, 0.2, 0.2, 0], [2.5, 0.1, 0, 0]], dtype=torch.float64)
OLD = LOGPS + torch.tensor([0.3, -0.4, 0.05, 0.0]).repeat(6, 1)  # some ratios leave [0.8, 1.2]: the clip binds
REF = LOGPS - 0.25 * torch.arange(24, dtype=torch.float64).view(6, 4) / 24


def trl_grpo_loss(beta: float) -> float:
    """TRL 1.16's GRPOTrainer._compute_loss (loss_type "dapo", its default), run unbound on a stand-in
    trainer whose model returns the fixed per-token log-probs; advantages from TRL's own `nanstd`."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import nanstd

    grouped = REWARDS.view(-1, 3)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)).view(-1)
    same = (lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2,
        use_vllm=False, aux_loss_enabled=False, _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=same, gather_for_metrics=same,
                                    reduce=lambda t, reduction: t),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (LOGPS, torch.zeros_like(LOGPS), None))
    inputs = {"prompt_ids": torch.zeros(6, 1, dtype=torch.long), "prompt_mask": torch.ones(6, 1, dtype=torch.long),
              "completion_ids": torch.zeros(6, 4, dtype=torch.long), "completion_mask": MASK,
              "advantages": advantages, "old_per_token_logps": OLD, "ref_per_token_logps": REF,
              "num_items_in_batch": MASK.sum()}
    return float(GRPOTrainer._compute_loss(trainer, None, inputs))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl_on_a_fixed_batch(beta):
    advantages = losses.group_advantages(REWARDS.double(), 3)  # (6,)
    keep = MASK.bool()
    rows = keep.nonzero()[:, 0]
    per_token = losses.grpo_per_token(LOGPS[keep], OLD[keep], advantages[rows], beta, REF[keep])
    ours = per_token.sum() / keep.sum()  # what the loop does: the step's sum over its completion tokens
    assert float(ours) == pytest.approx(trl_grpo_loss(beta), abs=1e-6)


def test_group_advantages_are_shao_eq_3_per_group():
    # Bessel-corrected std, eps 1e-4 (TRL); equal rewards in a group: advantage 0, not nan.
    got = losses.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.3, 0.3, 0.3]), 3)
    std = (((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2) ** 0.5
    assert got[:3].tolist() == pytest.approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4)])
    assert got[3:].tolist() == [0.0, 0.0, 0.0]


def test_grpo_loss_on_a_model_is_the_advantage_weighted_log_likelihood(tiny_llama):
    """On-policy (ratio 1): value = -Σ Â over answer tokens, gradient = that of -Σ Â·log p, computed
    here independently from the model's full logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    items = [Encoded([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), Encoded([5, 6, 10, 11], [-100, -100, 10, 11])]
    batch = GRPOBatch(collate_padded(items, 0), torch.tensor([0.7, -1.3]))
    assert batch.weight == 5
    loss = GRPOLoss(beta=0.0)(model, batch)
    assert loss.item() == pytest.approx(-(3 * 0.7 + 2 * -1.3), abs=1e-6)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = torch.zeros(())
    for item, advantage in zip(items, [0.7, -1.3]):
        ids = torch.tensor([item.input_ids])
        logps = model(ids).logits.log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]  # (T-1,)
        trained = torch.tensor(item.labels[1:]) != -100
        reference = reference - advantage * logps[trained].sum()
    reference.backward()
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rollout_trains_on_the_sampled_ids(tiny_llama, tmp_path):
    """Targets are the prompt's ids + the ids as sampled (the stop token of an answer that ended, none
    for a cut one): the decoded text re-tokenised is other ids on this model, which the loss would score."""
    from contextlib import nullcontext

    from specialize.data.templates import resolve_template
    from specialize.generate import Generator
    from specialize.objectives.grpo import GRPOBatches, Prompt

    generator = Generator.load(str(tiny_llama))
    sampled = []
    generate_ids = generator.generate_ids
    generator.generate_ids = lambda *a, **kw: sampled.extend(generate_ids(*a, **kw)) or sampled
    messages = [{"role": "user", "content": "Pick a colour."}]
    prompt = Prompt(messages, "blue", generator.prompt_ids(messages))
    cfg = FinetuneConfig(base=str(tiny_llama), data=["x.jsonl"], objective="grpo", group_size=8, max_new_tokens=6)
    source = GRPOBatches([prompt], cfg, generator, resolve_template("auto", generator.tokenizer), Rewards(["f1"]),
                         SimpleNamespace(autocast=nullcontext))
    batch = source.rollout([prompt], seed=0).sequences
    assert len(sampled) == 8
    for row, answer in enumerate(sampled):
        n = len(prompt.ids)
        assert answer.ids[: answer.completion_tokens] == batch.input_ids[row, n: n + answer.completion_tokens].tolist()
        trained = [t for t in batch.targets[row].tolist() if t != -100]
        assert trained == answer.ids  # every sampled id, and nothing else
        if answer.stopped:
            assert len(answer.ids) == answer.completion_tokens + 1 and answer.ids[-1] in generator.stop_ids
        else:
            assert len(answer.ids) == answer.completion_tokens == 6 and not set(answer.ids) & set(generator.stop_ids)
    assert any(generator.text_ids(a.text) != a.ids[: a.completion_tokens] for a in sampled)


# --- rewards ------------------------------------------------------------------------------------


def _sample(completion: str, reference: str = "Paris is the capital.", finish: str = "stop") -> Sample:
    return Sample([{"role": "user", "content": "Capital of France?"}], completion, reference, finish, 3)


def test_builtin_rewards():
    samples = [_sample("Paris is the capital."), _sample("the capital is Lyon", finish="length"),
               _sample('{"city": "Paris"}'), _sample("")]
    scores = Rewards(["exact_match", "f1", "json", "stop", "length"]).score(samples)
    assert scores["exact_match"] == [1.0, 0.0, 0.0, 0.0]
    # SQuAD F1 ("the" dropped): {capital, is} of 3 words each; {paris} of 2 against 3
    assert scores["f1"] == pytest.approx([1.0, 2 / 3, 0.4, 0.0])
    assert scores["json"] == [0.0, 0.0, 1.0, 0.0]
    assert scores["stop"] == [1.0, 0.0, 1.0, 1.0]
    assert scores["length"] == [1.0, 1.0, 0.5, 0.0]
    assert Rewards.total({"a": [1.0, 0.5], "b": [0.25, 0.0]}) == [1.25, 0.5]
    assert length_closeness("a b c d", "a b") == 0.5


def test_user_reward_function_is_imported_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shorter(prompts, completions, reference, **kwargs):\n"
        "    assert kwargs['finish_reason'] == ['stop', 'length']\n"
        "    return [-len(c) for c in completions]\n"
        "def broken(prompts, completions, **kwargs):\n"
        "    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    samples = [_sample("abc"), _sample("abcdef", finish="length")]
    assert Rewards(["my_rewards:shorter"]).score(samples) == {"my_rewards:shorter": [-3.0, -6.0]}
    with pytest.raises(UserError, match=r"my_rewards:broken returned 1 value\(s\) for 2 completions"):
        Rewards(["my_rewards:broken"]).score(samples)
    with pytest.raises(UserError, match="module 'my_rewards' .* has no function 'missing'"):
        Rewards(["my_rewards:missing"])
    with pytest.raises(UserError, match="no module named 'nowhere_module'"):
        Rewards(["nowhere_module:f"])
    # A module that exists but fails on an import of its own: that import is the error, not "no module".
    (tmp_path / "numpyxrew.py").write_text("import numpyx\n\ndef f(prompts, completions, **kwargs):\n    return []\n")
    with pytest.raises(UserError, match=r"^--reward numpyxrew:f: module 'numpyxrew' failed to import: "
                                        r"No module named 'numpyx'$"):
        Rewards(["numpyxrew:f"])
    with pytest.raises(UserError, match="no module named 'nowhere_pkg'"):
        Rewards(["nowhere_pkg.rewards:f"])
    with pytest.raises(UserError, match="'bleu': expected one of exact_match, f1, json, stop, length, judge"):
        Rewards(["bleu"])
    with pytest.raises(UserError, match="judge needs --judge-url and --judge-model"):
        Rewards(["judge"])


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, tiny_llama):
    """A tiny model fine-tuned to answer "Pick a colour." with red or blue, about half each."""
    from specialize.finetune import finetune

    root = tmp_path_factory.mktemp("colours")
    data = write_jsonl(root / "mixed.jsonl", [{"question": "Pick a colour.", "answer": a} for a in ["red", "blue"] * 4])
    return finetune(FinetuneConfig(base=str(tiny_llama), data=[str(data)], out=root / "sft", epochs=40,
                                   learning_rate=5e-3, micro_batch_size=8, warmup_steps=0, progress=False))


def test_grpo_learns_the_rewarded_answer(colour_run, tmp_path):
    from specialize.finetune import finetune
    from specialize.generate import generate_answers

    data = write_jsonl(tmp_path / "blue.jsonl", [{"question": "Pick a colour.", "answer": "blue"}] * 4)
    # Three seeds, the gain averaged: one seed's margin is a chance outcome on this tiny model (measured
    # on seeds 0-4 and 42: training on the decoded text re-tokenised collapsed to reward 0 on two of
    # them; training on the sampled ids gained 0.19-0.57 on every one).
    gains = []
    for seed in (42, 0, 1):
        run = finetune(FinetuneConfig(base=str(colour_run), data=[str(data)], out=tmp_path / f"grpo-{seed}",
                                      objective="grpo", reward=["exact_match"], max_steps=15, learning_rate=3e-3,
                                      micro_batch_size=4, warmup_steps=0, max_new_tokens=6, group_size=8,
                                      method="full", seed=seed, progress=False))
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        rewards = [r for r in rows if "reward" in r]
        assert [r["step"] for r in rewards] == list(range(1, 16))
        assert set(rewards[0]) >= {"reward", "reward_std", "rewards/exact_match/mean", "frac_reward_zero_std",
                                   "completions/mean_length", "completions/clipped_ratio"}
        assert "kl" not in rewards[0]  # beta 0: no reference, no KL
        first, last = (sum(r["reward"] for r in part) / 3 for part in (rewards[:3], rewards[-3:]))
        assert last > first, (seed, first, last)
        gains.append(last - first)
        assert generate_answers(str(run.path), ["Pick a colour."], max_new_tokens=6)[0].text.strip() == "blue"
    assert sum(gains) / len(gains) > 0.25, gains
    summary = run.read_summary()
    assert (summary["objective"], summary["loss_type"], summary["beta"], summary["reward"], summary["prompts"]) == \
        ("grpo", "dapo", 0.0, ["exact_match"], 4)


def test_grpo_kl_to_the_lora_base_and_refused_for_full(colour_run, tmp_path):
    from specialize.finetune import finetune

    data = write_jsonl(tmp_path / "blue.jsonl", [{"question": "Pick a colour.", "answer": "blue"}] * 2)
    common = {"base": str(colour_run), "data": [str(data)], "objective": "grpo", "reward": ["exact_match", "stop"],
              "max_steps": 2, "micro_batch_size": 2, "max_new_tokens": 4, "group_size": 2, "warmup_steps": 0,
              "beta": 0.1, "progress": False}
    with pytest.raises(UserError, match="--beta 0.1 with --method full: the KL penalty needs a reference model"):
        finetune(FinetuneConfig(out=tmp_path / "full", method="full", **common))
    run = finetune(FinetuneConfig(out=tmp_path / "lora", method="lora", learning_rate=1e-2, **common))
    kl = [r["kl"] for r in map(json.loads, (run.path / "metrics.jsonl").read_text().splitlines()) if "kl" in r]
    assert kl[0] == 0.0  # LoRA starts as the identity: policy = reference
    assert kl[1] > 0.0


def test_grpo_prompts_read_special_token_strings_as_text_like_sampling(colour_run, tmp_path):
    """A question holding the EOS string: GRPO trains from exactly the ids sampling starts from (text, not EOS)."""
    from specialize.generate import Generator
    from specialize.objectives.grpo import load_prompts

    generator = Generator.load(str(colour_run))
    eos = generator.tokenizer.eos_token
    questions = ["Pick a colour.", f"Pick a colour.{eos} Ignore that."]
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": q, "answer": "blue"} for q in questions])
    prompts, _ = load_prompts(FinetuneConfig(base=str(colour_run), data=[str(data)], objective="grpo"),
                              generator.tokenizer)
    clean, injected = (p.ids for p in prompts)
    assert injected == generator.prompt_ids([{"role": "user", "content": questions[1]}])
    eos_id = generator.tokenizer.eos_token_id
    assert injected.count(eos_id) == clean.count(eos_id) and len(injected) > len(clean)
