"""The preference losses as formulas on per-sequence log-probabilities, one function per paper.

Inputs are summed log-probabilities of each answer's tokens (shape (B,)): `policy_*` under the
model being trained, `reference_*` under the reference model (the model before this run).
Every function returns per-example losses (B,), so the caller can sum them (the loop divides
by the step's examples) or average them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_sigmoid(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β((πc - πr) - (ρc - ρr)))."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return -F.logsigmoid(beta * logits)


def ipo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
        reference_rejected: torch.Tensor, beta: float, chosen_tokens: torch.Tensor,
        rejected_tokens: torch.Tensor) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2β))², h = (πc - ρc) - (πr - ρr).

    Each log-ratio is divided by its answer's token count first, as TRL does (confirmed there with
    the paper's authors): the square of summed log-probs grows with answer length, and β would
    mean something different for every length.
    """
    h = (policy_chosen - reference_chosen) / chosen_tokens.clamp(min=1) \
        - (policy_rejected - reference_rejected) / rejected_tokens.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0 (expm1); x is kept below 0 so a perfectly fitted
    answer (mean log-prob exactly 0 in float32) gives a large finite odds, not infinity."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-7)))


def orpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
         rejected_tokens: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 6-7): NLL(chosen) + λ·(-log σ(log odds(c) - log odds(r))).

    With P = exp(mean token log-prob) of an answer, odds = P / (1 - P); the NLL is the chosen
    answer's mean token loss. No reference model.
    """
    mean_chosen = policy_chosen / chosen_tokens.clamp(min=1)
    mean_rejected = policy_rejected / rejected_tokens.clamp(min=1)
    log_odds = (mean_chosen - mean_rejected) - (_log1m_exp(mean_chosen) - _log1m_exp(mean_rejected))
    return -mean_chosen - lam * F.logsigmoid(log_odds)


def kto(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
        beta: float) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8, with TRL's weights of 1):

        desirable:   1 - σ(β(r - z0)),  undesirable: 1 - σ(β(z0 - r)),  r = π - ρ

    `kl` is z0, the reference point: TRL's batch estimate, the mean of π - ρ over mismatched
    prompt/completion pairs, clamped at 0 and without gradient (pass 0 for the simpler variant).
    """
    logratio = policy - reference
    return torch.where(desirable, 1 - torch.sigmoid(beta * (logratio - kl)),
                       1 - torch.sigmoid(beta * (kl - logratio)))


def kl_estimate(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's z0 from mismatched pairs: mean(π - ρ), clamped at 0, detached (a scalar; 0 without pairs)."""
    if policy_mismatched.numel() == 0:
        return torch.zeros((), device=policy_mismatched.device)
    return (policy_mismatched - reference_mismatched).mean().clamp(min=0).detach()
