"""PPO's reward shaping: running moments, scaling, normalisation, clipping, the KL penalty and
its controllers, and DAPO's overlong penalty. Each PPO-max switch (docs/ALGORITHMS.md) is one
function here, picked by the stage config; none is a branch inside one criterion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from rlhf_trainer.algos.policy_losses import KLEstimator, kl_penalty

# Below STD_FLOOR · max(1, |μ|) the running scores are equal up to float rounding (float32's
# relative precision is 6e-8; equal float64 scores can give a std of 1e-17): that std carries
# no scale, and dividing by it would turn rounding noise into rewards of 1e7.
STD_FLOOR = 1e-6


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


def has_scale(mean: float, std: float) -> bool:
    """Whether scores with this mean and std differ by more than rounding:
    std > STD_FLOOR · max(1, |mean|). With the (mean, std) of the whole step that
    `RunningMoments.update` returns (all ranks), False means every reward of the step was equal."""
    return std > STD_FLOOR * max(1.0, abs(mean))


def reward_scale(moments: RunningMoments) -> float:
    """The divisor of `scale_by_std` and `normalize`: σ_running when it carries scale information
    (`has_scale`), else 1, so the scores pass unscaled. A single score has none either (`var` is
    then 1). The former max(σ, 1e-8) divisor turned a first batch of equal scores into rewards
    of 7e7, and kept doing so while every score stayed equal."""
    std = moments.std
    return std if has_scale(moments.mean, std) else 1.0


def scale_by_std(scores: torch.Tensor, moments: RunningMoments) -> torch.Tensor:
    """`rewardScaling`: r / σ_running, no mean subtracted (MOSS-RLHF's default); σ from
    `reward_scale`, so equal scores pass unchanged."""
    return scores / reward_scale(moments)


def normalize(scores: torch.Tensor, moments: RunningMoments) -> torch.Tensor:
    """`rewardNormalization`: (r - μ_running) / σ_running; σ from `reward_scale`, so equal
    scores are only centred."""
    return (scores - moments.mean) / reward_scale(moments)


def all_equal(scores: torch.Tensor) -> bool:
    """Whether every score in this tensor is the same (True for none): such a step carries no
    reward signal, and the trainer warns. Exact and local to this rank; for the step across
    ranks use `has_scale` on the batch (mean, std) that `RunningMoments.update` returns."""
    return scores.numel() == 0 or bool(scores.max() == scores.min())


def clip_rewards(scores: torch.Tensor, bound: float) -> torch.Tensor:
    """`rewardClip`: clamp to [-δ, δ]."""
    return torch.clamp(scores, -bound, bound)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token rewards: r_t = -β KL_t on every response token, plus the scalar score on the last
    one (Ziegler et al. 2019; MOSS-RLHF), KL_t the `kl_penalty` estimate of log π_t - log π_ref,t
    (k1 by default, as those papers).

    scores: (B,); logprobs, ref_logprobs, mask: (B, R). Returns (B, R), 0 on padding.
    """
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")
    kl = kl_penalty(logprobs, ref_logprobs, cast(KLEstimator, estimator))
    rewards = -beta * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer: int, factor: float
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), added to the reward: with
    L_max = `max_len`, L_buf = `buffer` and k = L_max - L_buf,

      0                          |y| <= k
      (k - |y|) / L_buf · factor  k < |y| <= L_max
      -factor                    L_max < |y|

    lengths: (N,) response token counts (any dtype). Returns (N,) float32.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    n = lengths.float()
    free = float(max_len - buffer)
    ramp = (free - n) / buffer * factor
    penalty = torch.where(n <= max_len, ramp, torch.full_like(n, -factor))
    return torch.where(n <= free, torch.zeros_like(n), penalty)


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
