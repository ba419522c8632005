"""Advantages for the online stages: GAE (PPO), masked whitening, group-relative (GRPO), RLOO
and REINFORCE++, and the all-equal groups DAPO's dynamic sampling drops.

Pure functions of tensors. Response tensors are (B, R), left-aligned: column t is the t-th
response token of each sample, and `mask` is 1 on real tokens, 0 on padding after the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from rlhf_trainer.algos.reward_shaping import kl_penalized_rewards

GroupScale = Literal["group", "batch", "none"]
GROUP_EPS = 1e-4


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γ λ A_{t+1},   V and A are 0 past the last token,
    returns R_t = A_t + V_t.

    rewards, values, mask: (B, R) float. The per-token rewards carry the KL penalty on every
    token and the scalar reward on the last one (PPO-max's placement). Returns (advantages,
    returns), each (B, R) and 0 on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[Σ m x, Σ m x², Σ m] in float64, the sufficient statistics whitening all-reduces."""
    x64, m64 = x.double(), mask.double()
    return torch.stack([(x64 * m64).sum(), (x64 * x64 * m64).sum(), m64.sum()])


def whiten(
    x: torch.Tensor, mask: torch.Tensor, sums: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, from global `sums` (`masked_sums`
    added over ranks), with Bessel's correction; padding stays 0. PPO-max's
    `advantageWhitening` (MOSS-RLHF `utils.whiten`)."""
    total, total_sq, count = (float(v) for v in sums)
    mean = total / max(count, 1.0)
    var = (total_sq - count * mean * mean) / max(count - 1.0, 1.0)
    scale = (max(var, 0.0) + eps) ** -0.5
    out: torch.Tensor = (x - mean) * scale * mask
    return out


def group_advantages(rewards: torch.Tensor, group_size: int, scale: GroupScale) -> torch.Tensor:
    """GRPO's group-relative advantage of each completion (Shao et al. 2024):

    A_i = (r_i - mean(group)) / (std(group) + 1e-4)        scale = "group"
    A_i = (r_i - mean(group)) / (std(all rewards) + 1e-4)  scale = "batch"
    A_i =  r_i - mean(group)                               scale = "none"

    rewards: (P * G,), the G completions of each prompt contiguous. std is unbiased (Bessel),
    as TRL's. Returns (P * G,) float32.
    """
    r = rewards.float()
    groups = r.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1)
    else:
        std = r.std().expand_as(r)
    return centred / (std + GROUP_EPS)


def group_all_equal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per prompt, whether all G rewards of its group are equal (exactly), so that every
    group-relative advantage is 0 and the group carries no gradient: the groups DAPO's dynamic
    sampling drops (Yu et al. 2025; verl keeps groups whose reward std is > 0).

    rewards: (P * G,), the G completions of each prompt contiguous. Returns (P,) bool.
    """
    groups = rewards.view(-1, group_size)
    return groups.amax(dim=1) == groups.amin(dim=1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's leave-one-out advantage (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs"):

    A_i = r_i - mean_{j≠i} r_j = G / (G - 1) · (r_i - mean(group))

    rewards: (P * G,), groups contiguous, G >= 2. Returns (P * G,) in rewards' float dtype
    (float32 for integer rewards).
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 completions per prompt, got {group_size}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred * (group_size / (group_size - 1))).reshape(-1)


def reinforce_pp_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    sums_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models"; OpenRLHF `get_cumulative_returns`): the per-token reward is the k1 KL
    penalty -β (log π - log π_ref) plus the scalar score on the last token
    (`kl_penalized_rewards`), and the return with γ = 1 is G_t = Σ_{s >= t} r_s.

    scores: (B,); logprobs, ref_logprobs, mask: (B, R). With `sums_fn` None, returns the
    unwhitened returns (B, R), 0 on padding. Otherwise `sums_fn` maps this rank's
    `masked_sums(returns, mask)` to the global ones (an all-reduce; the identity on one rank),
    and the result is the advantage: the returns whitened over the whole batch (`whiten`).
    """
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, beta, "k1")
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    if sums_fn is None:
        return returns
    return whiten(returns, mask, sums_fn(masked_sums(returns, mask)))
