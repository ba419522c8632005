"""The RL options of issue 25 against naive references over python floats: clip-higher, dual
clip, truncated IS, the KL estimators, loss aggregation (with micro-batch invariance), RLOO,
REINFORCE++, DAPO's overlong penalty and all-equal groups; and the bugs it fixed, each first
reproduced: rewards of 7e7 from equal scores, the clip count, and infinities past 88 nats."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from rlhf_trainer.algos.advantages import (
    group_all_equal,
    masked_sums,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from rlhf_trainer.algos.policy_losses import (
    Aggregation,
    KLEstimator,
    aggregate_loss,
    approx_kl,
    clipped_surrogate,
    grpo_loss,
    kl_k3,
    kl_penalty,
    surrogate_tokens,
    truncated_is_weights,
)
from rlhf_trainer.algos.reward_shaping import (
    RunningMoments,
    all_equal,
    has_scale,
    kl_penalized_rewards,
    normalize,
    overlong_penalty,
    scale_by_std,
)

pytestmark = pytest.mark.unit

DTYPES = [torch.float32, torch.float64]
SHAPES = [(1, 1), (3, 5), (4, 7)]
ESTIMATORS: list[KLEstimator] = ["k1", "k2", "k3"]
MODES: list[Aggregation] = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def approx(want: float, dtype: torch.dtype) -> Any:
    """pytest.approx at the precision of the dtype."""
    eps = 1e-5 if dtype == torch.float32 else 1e-10
    return pytest.approx(want, rel=eps, abs=eps)


def random_mask(b: int, r: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Left-aligned response masks of random lengths 1..r (the first row full)."""
    lengths = torch.randint(1, r + 1, (b,), generator=gen)
    lengths[0] = r
    return (torch.arange(r)[None, :] < lengths[:, None]).to(dtype)


def clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


# -- reward scaling: equal scores --------------------------------------------------------------


@pytest.mark.parametrize("shape_fn", [scale_by_std, normalize])
@pytest.mark.parametrize(
    ("value", "dtype"),
    [(0.7, torch.float32), (0.1, torch.float64), (1000.0, torch.float32), (-3.0, torch.float64)],
)
def test_equal_scores_give_bounded_rewards_on_the_first_step_and_after(
    shape_fn: Callable[[torch.Tensor, RunningMoments], torch.Tensor],
    value: float,
    dtype: torch.dtype,
) -> None:
    """Was 7e7 for 0.7 (σ = 0 divided by max(σ, 1e-8)); equal float64 0.1s give σ ≈ 1.7e-17, not
    0, so the floor has to be a threshold, not a test for zero."""
    moments = RunningMoments()
    for n in (3, 8, 5):
        scores = torch.full((n,), value, dtype=dtype)
        moments.update(scores)
        out = shape_fn(scores, moments)
        assert torch.isfinite(out).all()
        assert float(out.abs().max()) <= abs(value) * (1 + 1e-6) + 1e-6
    # The first informative batch after them is scaled by the std of all scores seen.
    varied = torch.tensor([value - 1.0, value + 1.0], dtype=dtype)
    moments.update(varied)
    seen = [value] * 16 + [value - 1.0, value + 1.0]
    torch.testing.assert_close(scale_by_std(varied, moments), varied / float(np.std(seen, ddof=1)))


def test_a_small_but_real_spread_is_still_scaled() -> None:
    moments = RunningMoments()
    scores = torch.tensor([0.0, 1e-3, 2e-3], dtype=torch.float64)
    moments.update(scores)
    torch.testing.assert_close(scale_by_std(scores, moments), scores / 1e-3)
    assert has_scale(0.0, 1e-3) and not has_scale(1e3, 1e-4) and not has_scale(0.1, 1.7e-17)


def test_all_equal() -> None:
    for equal in (torch.full((4,), 0.3), torch.tensor([]), torch.tensor([2.0])):
        assert all_equal(equal)
    assert not all_equal(torch.tensor([0.3, 0.3, 0.30000001], dtype=torch.float64))


# -- the clipped surrogate ---------------------------------------------------------------------


def test_clip_count_is_where_the_clipped_branch_is_active_not_where_the_ratio_is_outside() -> None:
    """Ratio outside [1 - ε, 1 + ε] but the unclipped term wins (so the token keeps its gradient):
    not clipped, as OpenRLHF (`surr2 < surr1`), verl (`pg_losses2 > pg_losses1`) and TRL count.
    The old count took |ρ - 1| > ε and said 4 here."""
    log_ratio = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.1]])  # ρ = 2.7, 0.37, 2.7, 2.7, 1.1
    adv = torch.tensor([[-1.0, 1.0, 1.0, 0.0, 1.0]])
    _, clipped = surrogate_tokens(log_ratio, torch.zeros(1, 5), adv, torch.ones(1, 5), 0.2)
    assert clipped.tolist() == [[False, False, True, False, False]]
    _, count = clipped_surrogate(log_ratio, torch.zeros(1, 5), adv, torch.ones(1, 5), 0.2)
    assert float(count) == 1


def surrogate_loop(
    lp: float, lo: float, a: float, clip: float, high: float, dual: float | None, w: float
) -> tuple[float, bool]:
    ratio = math.exp(clamp(lp - lo, -20.0, 20.0))
    surr1, surr2 = -a * ratio, -a * clamp(ratio, 1 - clip, 1 + high)
    loss, clipped = max(surr1, surr2), surr2 > surr1
    if dual is not None and a < 0 and -a * dual < loss:
        loss, clipped = -a * dual, True
    return w * loss, clipped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("clip_high", "dual_clip", "weighted", "per_token_adv"),
    [(None, None, False, True), (0.28, None, False, False), (0.28, 3.0, True, True),
     (None, 2.0, True, False)],
)  # fmt: skip
def test_surrogate_tokens_match_a_loop(
    dtype: torch.dtype,
    shape: tuple[int, int],
    clip_high: float | None,
    dual_clip: float | None,
    weighted: bool,
    per_token_adv: bool,
) -> None:
    b, r = shape
    gen = torch.Generator().manual_seed(b * 10 + r)
    logp = -torch.rand(b, r, generator=gen, dtype=dtype) * 3
    old = logp + 1.5 * torch.randn(b, r, generator=gen, dtype=dtype)  # ratios well outside
    adv = torch.randn(b, r if per_token_adv else 1, generator=gen, dtype=dtype) * 2
    weights = torch.rand(b, r, generator=gen, dtype=dtype) * 2 if weighted else None
    mask = random_mask(b, r, gen, dtype)
    loss, clipped = surrogate_tokens(
        logp, old, adv, mask, 0.2, clip_high=clip_high, dual_clip=dual_clip, weights=weights
    )
    assert loss.shape == clipped.shape == (b, r) and clipped.dtype == torch.bool
    high = 0.2 if clip_high is None else clip_high
    total, count = 0.0, 0
    for i in range(b):
        for t in range(r):
            a = float(adv[i, t if per_token_adv else 0])
            w = 1.0 if weights is None else float(weights[i, t])
            want, want_clip = surrogate_loop(
                float(logp[i, t]), float(old[i, t]), a, 0.2, high, dual_clip, w
            )
            if mask[i, t] == 0:
                want, want_clip = 0.0, False
            assert float(loss[i, t]) == approx(want, dtype)
            assert bool(clipped[i, t]) == want_clip
            total, count = total + want, count + want_clip
    loss_sum, clip_count = clipped_surrogate(
        logp, old, adv, mask, 0.2, clip_high=clip_high, dual_clip=dual_clip, weights=weights
    )
    assert float(loss_sum) == approx(total, dtype) and float(clip_count) == count


@pytest.mark.parametrize("log_ratio", [200.0, -200.0, 1000.0])
@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_surrogate_is_finite_for_huge_log_ratios(log_ratio: float, advantage: float) -> None:
    """Was inf (exp(200) overflows float32) and then nan gradients."""
    logp = torch.full((1, 1), log_ratio, requires_grad=True)
    loss, _ = clipped_surrogate(
        logp, torch.zeros(1, 1), torch.full((1, 1), advantage), torch.ones(1, 1), 0.2
    )
    loss.backward()  # type: ignore[no-untyped-call]
    assert logp.grad is not None
    value = float(loss.detach())
    assert math.isfinite(value) and torch.isfinite(logp.grad).all() and value <= math.exp(20.0)


def test_dual_clip_bounds_the_loss_of_huge_ratios_with_negative_advantages() -> None:
    logp = torch.tensor([[30.0, 3.0, 0.1]], requires_grad=True)  # ρ = e^20 (clamped), 20, 1.1
    adv = torch.tensor([[-2.0, -2.0, -2.0]])
    loss, clipped = surrogate_tokens(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), 0.2,
                                     dual_clip=3.0)  # fmt: skip
    want = torch.tensor([[6.0, 6.0, 2 * math.exp(0.1)]])  # -c·A = 6 caps the first two
    torch.testing.assert_close(loss.detach(), want)
    assert clipped.tolist() == [[True, True, False]]
    loss.sum().backward()  # type: ignore[no-untyped-call]
    assert logp.grad is not None and logp.grad[0, :2].abs().max() == 0 and logp.grad[0, 2] != 0
    plain, _ = surrogate_tokens(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), 0.2)
    assert float(plain.detach()[0, 0]) == pytest.approx(2 * math.exp(20.0), rel=1e-5)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        surrogate_tokens(logp, logp, adv, torch.ones(1, 3), 0.2, dual_clip=1.0)


def test_clip_higher_widens_only_the_upper_bound() -> None:
    log_ratio = torch.tensor([[math.log(1.25), math.log(0.7)]])
    adv = torch.ones(1, 2)
    _, sym = surrogate_tokens(log_ratio, torch.zeros(1, 2), adv, torch.ones(1, 2), 0.2)
    loss, high = surrogate_tokens(
        log_ratio, torch.zeros(1, 2), adv, torch.ones(1, 2), 0.2, clip_high=0.28
    )
    assert sym.tolist() == [[True, False]] and high.tolist() == [[False, False]]
    # Below 1 - ε with A > 0 the pessimistic min() keeps the unclipped -ρA.
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -0.7]]))


# -- KL estimators -----------------------------------------------------------------------------


def kl_loop(lp: float, ref: float, estimator: str) -> float:
    d = lp - ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d * d / 2
    d = clamp(d, -20.0, 20.0)
    return clamp(math.exp(-d) - 1 + d, 0.0, 10.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_matches_a_loop(
    dtype: torch.dtype, shape: tuple[int, int], estimator: KLEstimator
) -> None:
    gen = torch.Generator().manual_seed(shape[0] + 7 * shape[1])
    logp = -torch.rand(shape, generator=gen, dtype=dtype) * 4
    ref = logp + 3 * torch.randn(shape, generator=gen, dtype=dtype)  # some k3 past the bound
    got = kl_penalty(logp, ref, estimator)
    want = [[kl_loop(a, b, estimator) for a, b in zip(x, y, strict=True)]
            for x, y in zip(logp.tolist(), ref.tolist(), strict=True)]  # fmt: skip
    torch.testing.assert_close(got, torch.tensor(want, dtype=dtype))
    if estimator == "k3":
        torch.testing.assert_close(kl_k3(logp, ref), got)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("gap", [200.0, -200.0])
def test_kl_penalty_is_finite_for_a_gap_of_200_nats(estimator: KLEstimator, gap: float) -> None:
    """k3 was inf past a gap of ~88 nats (exp overflow)."""
    logp = torch.zeros(1, 1, requires_grad=True)
    kl = kl_penalty(logp, torch.full((1, 1), -gap), estimator)
    kl.sum().backward()  # type: ignore[no-untyped-call]
    assert logp.grad is not None
    value = float(kl.detach())
    assert math.isfinite(value) and torch.isfinite(logp.grad).all()
    assert estimator != "k3" or value == 10.0
    assert math.isfinite(float(approx_kl(logp.detach(), logp.detach() + gap, torch.ones(1, 1))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalized_rewards_with_each_estimator(dtype: torch.dtype, estimator: str) -> None:
    gen = torch.Generator().manual_seed(11)
    logp = -torch.rand(3, 4, generator=gen, dtype=dtype)
    ref = logp + torch.randn(3, 4, generator=gen, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=dtype)
    scores = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    got = kl_penalized_rewards(scores, logp, ref, mask, 0.1, estimator)
    for i, n in enumerate([4, 2, 1]):
        for t in range(4):
            want = -0.1 * kl_loop(float(logp[i, t]), float(ref[i, t]), estimator) if t < n else 0
            want += float(scores[i]) if t == n - 1 else 0.0
            assert float(got[i, t]) == approx(want, dtype)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalized_rewards(scores, logp, ref, mask, 0.1, "k4")


# -- GRPO's per-token loss and its aggregation -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adv_dims", [1, 2])
def test_grpo_loss_per_token_matches_a_loop(dtype: torch.dtype, adv_dims: int) -> None:
    gen = torch.Generator().manual_seed(4)
    b, r = 4, 5
    logp = -torch.rand(b, r, generator=gen, dtype=dtype)
    old = logp + 0.5 * torch.randn(b, r, generator=gen, dtype=dtype)
    ref = logp + 0.5 * torch.randn(b, r, generator=gen, dtype=dtype)
    adv_shape = (b,) if adv_dims == 1 else (b, r)
    adv = torch.randn(adv_shape, generator=gen, dtype=dtype)
    weights = torch.rand(b, r, generator=gen, dtype=dtype) * 2
    mask = random_mask(b, r, gen, dtype)
    loss, clipped = grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04, clip_high=0.28,
                              weights=weights)  # fmt: skip
    for i in range(b):
        for t in range(r):
            a = float(adv[i] if adv_dims == 1 else adv[i, t])
            pg, is_clipped = surrogate_loop(
                float(logp[i, t]), float(old[i, t]), a, 0.2, 0.28, None, float(weights[i, t])
            )  # the IS weight multiplies the policy term only (TRL)
            want = pg + 0.04 * kl_loop(float(logp[i, t]), float(ref[i, t]), "k3")
            on = bool(mask[i, t])
            assert float(loss[i, t]) == approx(want if on else 0.0, dtype)
            assert bool(clipped[i, t]) == (is_clipped and on)


def agg_loop(loss: list[list[float]], mask: list[list[float]], mode: str, max_len: int) -> float:
    """verl's `agg_loss` over the whole batch, written out."""
    rows = [(sum(x * m for x, m in zip(xs, ms, strict=True)), sum(ms))
            for xs, ms in zip(loss, mask, strict=True)]  # fmt: skip
    live = [(s, n) for s, n in rows if n > 0]
    if mode == "token-mean":
        return sum(s for s, _ in live) / sum(n for _, n in live)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in live) / len(live)
    return sum(s for s, _ in live) / (len(live) * max_len)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [[8], [3, 5], [1, 1, 2, 4], [2, 2, 2, 2]])
def test_aggregate_loss_matches_verl_and_is_micro_batch_invariant(
    dtype: torch.dtype, mode: Aggregation, splits: list[int]
) -> None:
    """Sum of numerators over micro-batches / sum of units = the whole batch's verl value."""
    gen = torch.Generator().manual_seed(9)
    token_loss = torch.randn(8, 6, generator=gen, dtype=dtype)
    mask = random_mask(8, 6, gen, dtype)
    mask[5] = 0  # a sequence with no tokens counts in no unit
    want = agg_loop(token_loss.tolist(), mask.tolist(), mode, max_len=10)
    whole, units = aggregate_loss(token_loss, mask, mode, max_len=10)
    assert float(whole) / units == approx(want, dtype)
    numerator, total_units = 0.0, 0.0
    for rows in torch.split(torch.arange(8), splits):
        part, part_units = aggregate_loss(token_loss[rows], mask[rows].bool(), mode, 10)
        numerator, total_units = numerator + float(part), total_units + part_units
    assert numerator / total_units == approx(want, dtype)
    assert total_units == (float(mask.sum()) if mode == "token-mean" else 7.0)


# -- truncated importance sampling ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_truncated_is_weights_match_a_loop(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    b, r = shape
    gen = torch.Generator().manual_seed(3 * b + r)
    old = -torch.rand(b, r, generator=gen, dtype=dtype) * 2
    behaviour = old + torch.randn(b, r, generator=gen, dtype=dtype)
    behaviour[0, 0] = old[0, 0] - 200.0  # a token the rollout engine found 200 nats less likely
    mask = random_mask(b, r, gen, dtype)
    weights, sums = truncated_is_weights(old.clone().requires_grad_(True), behaviour, mask, 2.0)
    assert not weights.requires_grad and weights.shape == (b, r)
    want = {"is_weight": 0.0, "is_capped": 0.0, "rollout_mismatch_kl": 0.0}
    for i in range(b):
        for t in range(r):
            raw = math.exp(clamp(float(old[i, t] - behaviour[i, t]), -20.0, 20.0))
            on = float(mask[i, t])
            assert float(weights[i, t]) == approx(min(raw, 2.0) * on, dtype)
            want["is_weight"] += min(raw, 2.0) * on
            want["is_capped"] += float(raw > 2.0) * on
            kl = kl_loop(float(behaviour[i, t]), float(old[i, t]), "k3")
            want["rollout_mismatch_kl"] += kl * on
    assert sums.keys() == want.keys()
    for key, value in want.items():
        assert math.isfinite(sums[key]) and sums[key] == approx(value, dtype)
    assert float(weights[0, 0]) == 2.0 and sums["is_capped"] >= 1


# -- advantages --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("prompts", "size"), [(1, 2), (3, 4), (5, 8)])
def test_rloo_matches_leave_one_out_means(dtype: torch.dtype, prompts: int, size: int) -> None:
    gen = torch.Generator().manual_seed(prompts * size)
    rewards = torch.randn(prompts * size, generator=gen, dtype=dtype)
    got = rloo_advantages(rewards, size)
    assert got.dtype == dtype
    values = rewards.tolist()
    for g in range(prompts):
        group = values[g * size : (g + 1) * size]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            assert float(got[g * size + i]) == approx(r - sum(others) / len(others), dtype)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, 1)


def returns_loop(rewards: list[float], n: int) -> list[float]:
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(n)):
        running = rewards[t] + running
        out[t] = running
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reinforce_pp_returns_and_whitening_over_ranks(
    dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    b, r = shape
    gen = torch.Generator().manual_seed(b + r)
    logp = -torch.rand(b, r, generator=gen, dtype=dtype)
    ref = logp + 0.3 * torch.randn(b, r, generator=gen, dtype=dtype)
    mask = random_mask(b, r, gen, dtype)
    scores = torch.randn(b, generator=gen, dtype=dtype)
    returns = reinforce_pp_advantages(scores, logp, ref, mask, beta=0.05)
    flat = []
    for i in range(b):
        n = int(mask[i].sum())
        rewards = [-0.05 * float(logp[i, t] - ref[i, t]) for t in range(n)] + [0.0] * (r - n)
        rewards[n - 1] += float(scores[i])
        want = returns_loop(rewards, n)
        for t in range(r):
            assert float(returns[i, t]) == approx(want[t], dtype)
        flat += want[:n]
    # Whitened over the batch: two "ranks" holding half the rows each, sums_fn the all-reduce.
    half = max(b // 2, 1)
    parts = [slice(0, half), slice(half, b)]
    local = [masked_sums(returns[p], mask[p]) for p in parts]
    total = local[0] + local[1]
    advantages = torch.cat([
        reinforce_pp_advantages(scores[p], logp[p], ref[p], mask[p], 0.05, lambda _: total)
        for p in parts
    ])  # fmt: skip
    values = np.array(flat)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    want_white = (values - values.mean()) / math.sqrt(std**2 + 1e-8)
    np.testing.assert_allclose(advantages[mask.bool()].numpy(), want_white, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(advantages, whiten(returns, mask, masked_sums(returns, mask)))


def test_overlong_penalty_matches_the_dapo_formula() -> None:
    lengths = torch.arange(0, 24)
    got = overlong_penalty(lengths, max_len=20, buffer=4, factor=0.5)
    for n, value in zip(lengths.tolist(), got.tolist(), strict=True):
        want = 0.0 if n <= 16 else (16 - n) / 4 * 0.5 if n <= 20 else -0.5
        assert value == pytest.approx(want)
    assert got.dtype == torch.float32 and float(got[20]) == -0.5 and float(got[16]) == 0.0
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(lengths, max_len=20, buffer=0, factor=1.0)


@pytest.mark.parametrize(("prompts", "size"), [(1, 2), (4, 3), (6, 8)])
def test_group_all_equal_matches_a_loop(prompts: int, size: int) -> None:
    gen = torch.Generator().manual_seed(prompts)
    rewards = torch.randint(0, 2, (prompts * size,), generator=gen).float()
    rewards[:size] = 1.0  # at least one uniform group
    got = group_all_equal(rewards, size)
    values = rewards.tolist()
    want = [len(set(values[g * size : (g + 1) * size])) == 1 for g in range(prompts)]
    assert got.tolist() == want and got[0]
