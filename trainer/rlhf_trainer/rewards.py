"""PPO's reward shaping: running moments, scaling, normalisation, clipping, the KL penalty and
its controllers. Each PPO-max switch (ALGORITHMS.md) is one function here, picked by the
stage config; none is a branch inside one criterion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlhf_trainer.losses import kl_k1


@dataclass
class RunningMoments:
    """Mean and variance of every score seen so far, merged batch by batch with Chan et al.'s
    parallel update ("Updating formulae and a pairwise algorithm for computing sample
    variances", 1979): with counts n_a, n_b, means μ_a, μ_b and sums of squared deviations
    M_a, M_b, δ = μ_b - μ_a:

        n = n_a + n_b,  μ = μ_a + δ n_b / n,  M = M_a + M_b + δ² n_a n_b / n

    `std` has Bessel's correction, sqrt(M / (n - 1)). Saved in checkpoints (`state_dict`).
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1.0) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def merge(self, count: float, mean: float, m2: float) -> None:
        """Fold in another set's (n, μ, M): Chan's update."""
        if count <= 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def update(self, scores: torch.Tensor) -> tuple[float, float]:
        """Merge this rank's `scores` (1-D) and every other rank's (collective when a process
        group exists: each rank's (n, μ, M) is all-gathered and folded in rank order, Chan's
        update across ranks). Returns the mean and std (Bessel) of the whole new batch."""
        local = _moments(scores)
        parts = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            parts = [tuple(p) for p in gathered]
        batch = RunningMoments()
        for part in parts:
            batch.merge(*part)
        self.merge(batch.count, batch.mean, batch.m2)
        return batch.mean, batch.std

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    """(n, μ, M) of a 1-D tensor, in float64."""
    x64 = x.detach().double().reshape(-1)
    n = float(x64.numel())
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = float(x64.mean())
    return n, mean, float(((x64 - mean) ** 2).sum())


def scale_by_std(scores: torch.Tensor, moments: RunningMoments) -> torch.Tensor:
    """`rewardScaling`: r / σ_running, no mean subtracted (MOSS-RLHF's default)."""
    return scores / max(moments.std, 1e-8)


def normalize(scores: torch.Tensor, moments: RunningMoments) -> torch.Tensor:
    """`rewardNormalization`: (r - μ_running) / σ_running."""
    return (scores - moments.mean) / max(moments.std, 1e-8)


def clip_rewards(scores: torch.Tensor, bound: float) -> torch.Tensor:
    """`rewardClip`: clamp to [-δ, δ]."""
    return torch.clamp(scores, -bound, bound)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-token rewards: r_t = -β (log π_t - log π_ref,t) on every response token (k1), plus the
    scalar score on the last one (Ziegler et al. 2019; MOSS-RLHF).

    scores: (B,); logprobs, ref_logprobs, mask: (B, R). Returns (B, R), 0 on padding.
    """
    rewards = -beta * kl_k1(logprobs, ref_logprobs) * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


class FixedKLController:
    """`klController: fixed`: β stays as configured."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def update(self, kl: float, n_samples: int) -> None:
        del kl, n_samples

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = state["beta"]


class AdaptiveKLController(FixedKLController):
    """`klController: adaptive` (Ziegler et al. 2019): move β toward a target KL,

    e = clip(KL / target - 1, -0.2, 0.2),   β ← β (1 + e · n / horizon)

    with n the samples of the step and KL the step's mean per-sequence KL.
    """

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_samples / self.horizon
