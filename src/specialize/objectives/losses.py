"""The preference and reward losses as formulas, one function per paper.

Preference inputs are summed log-probabilities of each answer's tokens (shape (B,)): `policy_*`
under the model being trained, `reference_*` under the reference model (the model before this
run); those functions return per-example losses (B,), which the caller sums (the loop divides by
the step's examples). GRPO's are per completion token (N,), see `grpo_per_token`.
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


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen answers' SFT loss, next to DPO (RPO, Pang et al. 2024): their mean token NLL (a scalar).

    Averaged over all chosen tokens of the batch, as TRL's `loss_type=[..., "sft"]` does, so that it
    pulls the preferred answers up instead of letting DPO lower both sides (the known drift).
    """
    return -policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)


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


# ---------------------------------------------------------------------------------------------
# GRPO (Shao et al. 2024, DeepSeekMath §4.1), per token, as TRL 1.16's GRPOTrainer computes it.


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Â_i = (r_i - mean(group)) / (std(group) + eps) for consecutive groups of `group_size` (B,) -> (B,).

    The group's standard deviation has Bessel's correction and eps is 1e-4, as TRL's
    `scale_rewards="group"` (its default); a group whose rewards are all equal gets advantage 0.
    """
    grouped = rewards.view(-1, group_size)  # (G groups, group_size)
    mean, std = grouped.mean(dim=1, keepdim=True), grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def grpo_per_token(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, beta: float = 0.0,
                   reference_logps: torch.Tensor | None = None, epsilon: float = 0.2) -> torch.Tensor:
    """The clipped surrogate plus the KL penalty, per completion token (N,) -> (N,):

        -min(ρ·Â, clip(ρ, 1-ε, 1+ε)·Â) + β·(exp(ref - π) - (ref - π) - 1),   ρ = exp(π - π_old)

    (the KL term is Schulman's unbiased k3 estimator, as in the paper and TRL). With one optimizer
    step per batch of samples, π_old is π itself (detached): ρ = 1, nothing is clipped, and the
    gradient is -Â·∇π (+ the KL's). The caller sums these over every completion token of the step
    and divides by their count: TRL's default `loss_type="dapo"` (Yu et al. 2025), which weighs
    every token alike instead of averaging per sequence first (the original GRPO's length bias).
    """
    ratio = torch.exp(logps - old_logps)
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)
    if beta:
        delta = reference_logps - logps
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    return per_token
