"""Preference losses against their published formulas, and DPO/IPO against TRL's own code, on fixed log-probs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from specialize.objectives import losses

# Two pairs: summed log-probs of each answer under the policy (π) and the reference (ρ), and answer lengths.
PC = torch.tensor([-12.0, -30.5], dtype=torch.float64)
PR = torch.tensor([-15.0, -28.0], dtype=torch.float64)
RC = torch.tensor([-13.5, -29.0], dtype=torch.float64)
RR = torch.tensor([-14.0, -29.0], dtype=torch.float64)
NC = torch.tensor([4, 10])
NR = torch.tensor([5, 8])
sig = (lambda x: 1 / (1 + math.exp(-x)))


def test_dpo_sigmoid_is_rafailov_eq_7():
    beta = 0.1
    got = losses.dpo_sigmoid(PC, PR, RC, RR, beta)
    # pair 1: (πc-πr)-(ρc-ρr) = (3) - (0.5) = 2.5 ; pair 2: (-2.5) - (0) = -2.5
    assert got.tolist() == pytest.approx([-math.log(sig(0.25)), -math.log(sig(-0.25))], abs=1e-12)


def test_ipo_is_azar_eq_17_on_per_token_log_ratios():
    beta = 0.5
    got = losses.ipo(PC, PR, RC, RR, beta, NC, NR)
    h1 = (-12 + 13.5) / 4 - (-15 + 14) / 5  # 0.375 + 0.2
    h2 = (-30.5 + 29) / 10 - (-28 + 29) / 8  # -0.15 - 0.125
    assert got.tolist() == pytest.approx([(h1 - 1.0) ** 2, (h2 - 1.0) ** 2], abs=1e-12)


def test_orpo_is_hong_eqs_6_7():
    lam = 0.2
    got = losses.orpo(PC, PR, NC, NR, lam)
    expected = []
    for pc, pr, nc, nr in zip(PC.tolist(), PR.tolist(), NC.tolist(), NR.tolist()):
        p_c, p_r = math.exp(pc / nc), math.exp(pr / nr)
        log_odds_ratio = math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
        expected.append(-pc / nc + lam * -math.log(sig(log_odds_ratio)))
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_orpo_of_a_perfectly_fitted_answer_is_finite():
    got = losses.orpo(torch.tensor([0.0]), torch.tensor([-5.0]), torch.tensor([3]), torch.tensor([3]), 0.1)
    assert torch.isfinite(got).all()


def test_kto_is_ethayarajh_eq_8_with_the_batch_kl_estimate():
    beta = 0.1
    policy = torch.tensor([-10.0, -20.0, -7.0], dtype=torch.float64)
    reference = torch.tensor([-12.0, -18.0, -7.5], dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    # z0 from mismatched prompt/completion pairs: mean(π - ρ) = mean(1, -0.5, 2.5) = 1, clamped at 0
    z0 = losses.kl_estimate(torch.tensor([-30.0, -31.0, -29.5]), torch.tensor([-31.0, -30.5, -32.0]))
    assert float(z0) == pytest.approx(1.0)
    assert float(losses.kl_estimate(torch.tensor([-30.0]), torch.tensor([-29.0]))) == 0.0  # clamped
    got = losses.kto(policy, reference, desirable, z0.double(), beta)
    expected = [1 - sig(beta * (2 - 1)), 1 - sig(beta * (1 - (-2))), 1 - sig(beta * (0.5 - 1))]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    zero = losses.kto(policy, reference, desirable, torch.zeros((), dtype=torch.float64), beta)  # z0 = 0 variant
    assert zero.tolist() == pytest.approx([1 - sig(0.2), 1 - sig(0.2), 1 - sig(0.05)], abs=1e-12)


def trl_dpo_loss(loss_type: str | list[str], beta: float, pc, pr, rc, rr, nc, nr,
                 weights: list[float] | None = None) -> float:
    """TRL 1.16's own DPOTrainer._compute_loss, run on fixed log-probs.

    TRL has no standalone DPO loss function any more (the formula lives inside `_compute_loss`),
    so the method is called unbound on a stand-in trainer whose "model" returns per-token
    log-probs that sum to the given sequence log-probs, with precomputed reference log-probs.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    n, width = len(pc), int(max(nc.max(), nr.max())) + 1
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    for row, count in enumerate(torch.cat([nc, nr]).tolist()):
        completion_mask[row, 1: 1 + count] = 1
    log_probs = torch.zeros(2 * n, width - 1, dtype=torch.float64)
    for row, (total, count) in enumerate(zip(torch.cat([pc, pr]).tolist(), torch.cat([nc, nr]).tolist())):
        log_probs[row, :count] = total / count  # per token; TRL sums them (DPO) or averages them (its sft term)

    def model(**kwargs):
        shape = log_probs.shape
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                               is_top1=torch.zeros(shape, dtype=torch.bool))

    same = (lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=same,
                                                                          gather_for_metrics=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type] if isinstance(loss_type, str) else loss_type,
        loss_weights=weights or [1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long), "attention_mask": torch.ones(2 * n, width),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return float(DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_equals_trl(beta):
    ours = losses.dpo_sigmoid(PC, PR, RC, RR, beta).mean()
    assert float(ours) == pytest.approx(trl_dpo_loss("sigmoid", beta, PC, PR, RC, RR, NC, NR), abs=1e-5)


def test_chosen_nll_is_the_mean_token_nll_of_the_chosen_answers():
    assert float(losses.chosen_nll(PC, NC)) == pytest.approx((12.0 + 30.5) / (4 + 10), abs=1e-12)


@pytest.mark.parametrize("dpo_loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_dpo_with_the_sft_term_equals_trl(weight, dpo_loss, monkeypatch):
    """RPO: TRL's loss_type=[dpo_loss, "sft"] with loss_weights [1, w] on one micro-batch, through the
    loop's own `PreferenceLoss` (its sum over pairs, divided by the pairs as the loop divides a step)."""
    from specialize.objectives import preference

    # The model's summed answer log-probs and answer lengths, as `sequence_logps` returns them: PC, PR.
    monkeypatch.setattr(preference, "sequence_logps", lambda model, rows, only_targets: (torch.cat([PC, PR]),
                                                                                          torch.cat([NC, NR])))
    batch = preference.PreferenceBatch(sequences=None, n=2, reference=torch.stack([RC, RR], dim=1))
    ours = preference.PreferenceLoss("dpo", 0.1, dpo_loss, weight)(object(), batch) / batch.weight
    trl = trl_dpo_loss([dpo_loss, "sft"], 0.1, PC, PR, RC, RR, NC, NR, weights=[1.0, weight])
    assert float(ours) == pytest.approx(trl, abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_equals_trl(beta):
    ours = losses.ipo(PC, PR, RC, RR, beta, NC, NR).mean()
    assert float(ours) == pytest.approx(trl_dpo_loss("ipo", beta, PC, PR, RC, RR, NC, NR), abs=1e-5)
