"""Advantages for the online stages: GAE (PPO), masked whitening, group-relative (GRPO).

Pure functions of tensors. Response tensors are (B, R), left-aligned: column t is the t-th
response token of each sample, and `mask` is 1 on real tokens, 0 on padding after the end.
"""

from __future__ import annotations

from typing import Literal

import torch

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
