"""The online RL objectives of PPO and GRPO as pure functions of tensors; imports only torch.

Shapes: (B, R) response tensors, left-aligned, `mask` 1 on real tokens and 0 on padding (float
or bool). Every exp of a log-ratio first clamps it to ±LOG_RATIO_LIMIT, as verl does
(`compute_policy_loss`, `kl_penalty`): a 200-nat gap (a token the trainer and the rollout
engine disagree on, or a diverged step) then gives a large finite loss, not inf or nan.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

LOG_RATIO_LIMIT = 20.0  # exp(20) ≈ 4.9e8, far from float32's overflow at exp(88.7)
KL_LIMIT = 10.0  # verl's bound on low_var_kl (k3) per token


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator
) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from tokens sampled from π, with d = log π - log π_ref
    (Schulman 2020, "Approximating KL divergence"; OpenRLHF `compute_approx_kl`, verl `kl_penalty`):

      k1 = d                 unbiased, can be negative
      k2 = d² / 2            biased, never negative
      k3 = exp(-d) - 1 + d   unbiased, never negative; d clamped to ±20 and the result to [0, 10]

    Only k3 is clamped, as in verl: it is the one with an exp; k1 and k2 are finite for finite
    inputs, and clamping them would bias the penalty. (B, R), (B, R) -> (B, R).
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        d = torch.clamp(d, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        return torch.clamp(torch.expm1(-d) + d, 0.0, KL_LIMIT)
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """`kl_penalty(..., "k1")`: log π - log π_ref, the PPO reward penalty (Ziegler et al. 2019;
    MOSS-RLHF). (B, R) -> (B, R)."""
    return kl_penalty(logprobs, ref_logprobs, "k1")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """`kl_penalty(..., "k3")`: exp(r) - r - 1 with r = log π_ref - log π, clamped; GRPO's KL term
    (Shao et al. 2024, "DeepSeekMath"). (B, R) -> (B, R)."""
    return kl_penalty(logprobs, ref_logprobs, "k3")


def surrogate_tokens(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    *,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017), with clip-higher, dual clip and
    truncated importance weights:

      ρ_t = exp(clamp(log π - log π_old, ±20)),  ε_h = clip_high or ε
      l_t = max(-ρ_t A_t, -clip(ρ_t, 1 - ε, 1 + ε_h) A_t)          (DAPO clip-higher, Yu et al.)
      l_t = min(l_t, -c A_t)  where A_t < 0, with c = dual_clip > 1  (Ye et al. 2020; verl
                                                                       `clip_ratio_c`)
      l_t = w_t l_t,  w = weights detached                          (truncated IS, Yao et al.)

    logprobs, old_logprobs, mask: (B, R); advantages: (B, R) or (B, 1); weights: (B, R) or None.
    Returns (loss (B, R), clipped (B, R) bool), both 0 on padding. A token is clipped where a
    clipped branch is strictly the one taken: -clip(ρ)A > -ρA, or the dual bound -cA is below
    both (OpenRLHF `surr2 < surr1`, verl `pg_losses2 > pg_losses1`); a ratio outside the range
    whose unclipped term wins (e.g. ρ > 1 + ε with A < 0) is not clipped and keeps its gradient.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    high = clip if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped_term = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    if dual_clip is not None:
        bound = -advantages * dual_clip
        lower = (advantages < 0) & (bound < loss)
        loss = torch.where(lower, bound, loss)
        clipped = clipped | lower
    if weights is not None:
        loss = loss * weights.detach()
    return loss * mask.to(loss.dtype), clipped & mask.bool()


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    *,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`surrogate_tokens` summed over the masked tokens: returns (loss sum, number of tokens where a
    clip is active), both 0-d in the dtype of the loss; the caller divides both by the token
    count of the whole batch (the clip fraction is the second over that count)."""
    loss, clipped = surrogate_tokens(
        logprobs, old_logprobs, advantages, mask, clip,
        clip_high=clip_high, dual_clip=dual_clip, weights=weights,
    )  # fmt: skip
    return loss.sum(), clipped.sum().to(loss.dtype)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> torch.Tensor:
    """The critic's loss, summed over the tokens in `mask`:

    L = sum_t m_t * 0.5 * max((V_t - R_t)², (clip(V_t, V_old ± ε_v) - R_t)²)

    or the plain 0.5 (V - R)² when `clip` is None. The clipped form is PPO-max's `valueClip`
    (Zheng et al. 2023, MOSS-RLHF `ppo_trainer.py`). All inputs (B, R); returns a 0-d tensor.
    """
    loss = (values - returns) ** 2
    if clip is not None:
        bounded = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (bounded - returns) ** 2)
    return 0.5 * (loss * mask).sum()


def approx_kl(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Summed k3 estimate of KL(π_old || π) over masked tokens: (ρ - 1) - log ρ, clamped as in
    `kl_penalty`; the "approx_kl" diagnostic of PPO implementations. (B, R) inputs; 0-d output."""
    return (kl_penalty(old_logprobs, logprobs, "k3") * mask).sum()


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    beta: float,
    *,
    clip_high: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's per-token objective (Shao et al. 2024), not yet aggregated:

      l_t = w_t · max(-ρ_t A, -clip(ρ_t, 1 - ε, 1 + ε_h) A) + β k3_t,   k3 = `kl_penalty` "k3"

    The importance weight w multiplies the policy term only, as TRL's
    `vllm_importance_sampling_correction` does. logprobs, old_logprobs, ref_logprobs, mask:
    (B, R); advantages: (B,) (the completion's group-relative advantage, on all its tokens) or
    (B, R); weights: (B, R) or None. `ref_logprobs` may be None when β = 0. Returns (loss (B, R),
    clipped (B, R) bool), 0 on padding; `aggregate_loss` reduces the loss.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    loss, clipped = surrogate_tokens(
        logprobs, old_logprobs, adv, mask, clip, clip_high=clip_high, weights=weights
    )
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logprobs")
        loss = loss + beta * kl_penalty(logprobs, ref_logprobs, "k3") * mask.to(loss.dtype)
    return loss, clipped


def aggregate_loss(
    token_loss: torch.Tensor, mask: torch.Tensor, mode: Aggregation, max_len: int
) -> tuple[torch.Tensor, float]:
    """A micro-batch's share of the loss as (numerator, units): the loss of the step is the sum of
    the numerators over micro-batches and ranks divided by the sum of the units, which makes it
    independent of how the batch is split. With n_b = Σ_t m_bt and L_max = `max_len`:

      token-mean               Σ_bt m l / Σ_bt m          units: tokens             (DAPO)
      seq-mean-token-mean      Σ_b (Σ_t m l / n_b) / N    units: sequences, n_b > 0 (DeepSeekMath)
      seq-mean-token-sum-norm  Σ_bt m l / (N · L_max)     units: sequences, n_b > 0 (Dr.GRPO)

    Divided by the global count of its units, this is verl's `agg_loss` with `batch_num_tokens`
    (token-mean) or `global_batch_size` (the two others: sequences with at least one token) set
    to the global counts and `loss_scale_factor` = L_max. token_loss, mask: (B, R). Returns
    (0-d tensor in token_loss's dtype, float).
    """
    m = mask.to(token_loss.dtype)
    per_seq = (token_loss * m).sum(-1)
    if mode == "token-mean":
        return per_seq.sum(), float(m.sum())
    n_tokens = m.sum(-1)
    sequences = float((n_tokens > 0).sum())
    if mode == "seq-mean-token-mean":
        return (per_seq / n_tokens.clamp(min=1.0)).sum(), sequences
    if mode == "seq-mean-token-sum-norm":
        if max_len <= 0:
            raise ValueError(f"seq-mean-token-sum-norm needs max_len > 0, got {max_len}")
        return per_seq.sum() / max_len, sequences
    raise ValueError(f"unknown loss aggregation {mode!r}")


@torch.no_grad()
def truncated_is_weights(
    old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights for the rollout/trainer mismatch (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"; TRL
    `vllm_importance_sampling_correction`, verl rollout correction):

      w_t = min(exp(clamp(log π_old - log π_rollout, ±20)), C)

    with π_old from a trainer forward pass and π_rollout the behaviour logprobs the rollout engine
    returned. old_logprobs, behaviour_logprobs, mask: (B, R). Returns (w (B, R) detached, 0 on
    padding, sums): "is_weight" = Σ m w, "is_capped" = Σ m [raw ratio > C] and
    "rollout_mismatch_kl" = Σ m k3, the clamped k3 estimate of KL(π_rollout || π_old) (samples
    come from π_rollout); the caller divides each by the token count.
    """
    raw = torch.exp(
        torch.clamp(old_logprobs - behaviour_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    )
    m = mask.to(raw.dtype)
    weights = torch.clamp(raw, max=cap) * m
    kl = kl_penalty(behaviour_logprobs, old_logprobs, "k3")
    sums = {
        "is_weight": float(weights.sum()),
        "is_capped": float(((raw > cap).to(raw.dtype) * m).sum()),
        "rollout_mismatch_kl": float((kl * m).sum()),
    }
    return weights, sums
