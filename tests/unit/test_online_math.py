"""The math of the online stages against naive references written out step by step: GAE,
whitening, GRPO's group advantages, running moments (Chan) over random chunks and across two
ranks, every PPO-max reward switch, the KL estimators and the PPO/GRPO losses."""

from __future__ import annotations

import math
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_trainer.algos.advantages import gae, group_advantages, masked_sums, whiten
from rlhf_trainer.algos.losses import (
    LOGPROB_BLOCK,
    entropy_from_logits,
    token_logprobs,
    token_logprobs_and_entropy,
)
from rlhf_trainer.algos.policy_losses import (
    approx_kl,
    clipped_surrogate,
    clipped_value_loss,
    grpo_loss,
    kl_k1,
    kl_k3,
)
from rlhf_trainer.algos.reward_shaping import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_rewards,
    kl_penalized_rewards,
    normalize,
    scale_by_std,
)

pytestmark = pytest.mark.unit

DTYPES = [torch.float32, torch.float64]


def ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])


def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """One response, the textbook recursion with V after the last token = 0."""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_a_per_sample_loop(dtype: torch.dtype, gamma: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(0)
    lengths, width = [5, 1, 3, 7], 7
    mask = ragged_mask(lengths, width).to(dtype)
    rewards = torch.randn(4, width, generator=gen, dtype=dtype)
    values = torch.randn(4, width, generator=gen, dtype=dtype)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected = gae_loop(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        torch.testing.assert_close(advantages[b, :n], torch.tensor(expected, dtype=dtype))
        torch.testing.assert_close(returns[b, :n], advantages[b, :n] + values[b, :n])
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_gae_with_reward_on_last_token_only_and_zero_values_is_the_score() -> None:
    mask = ragged_mask([3], 4)
    rewards = torch.tensor([[0.0, 0.0, 2.0, 9.0]])  # padding holds junk; it must be ignored
    advantages, _ = gae(rewards, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[2.0, 2.0, 2.0, 0.0]]))


def test_whitening_uses_global_masked_stats_with_bessel() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # Two "ranks" each hold one row; their sums add up to the global statistics.
    sums = masked_sums(x[:1], mask[:1]) + masked_sums(x[1:], mask[1:])
    white = whiten(x, mask, sums)
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (values - values.mean()) / math.sqrt(values.var(ddof=1) + 1e-8)
    got = white[mask.bool()].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert white[~mask.bool()].abs().sum() == 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_against_a_loop(scale: str) -> None:
    rng = random.Random(1)
    groups, size = 5, 4
    rewards = [float(rng.choice([0.0, 0.5, 1.0])) for _ in range(groups * size)]
    out = group_advantages(torch.tensor(rewards), size, scale).tolist()  # type: ignore[arg-type]
    batch_std = float(np.std(rewards, ddof=1))
    for g in range(groups):
        chunk = rewards[g * size : (g + 1) * size]
        mean, std = float(np.mean(chunk)), float(np.std(chunk, ddof=1))
        for i, r in enumerate(chunk):
            denominator = {"group": std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
            assert out[g * size + i] == pytest.approx((r - mean) / denominator, abs=1e-5)


def test_group_advantages_of_a_uniform_group_are_zero() -> None:
    out = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 3, "group")
    assert out[:3].abs().max() == 0 and out[3:].abs().max() > 0


def test_running_moments_match_numpy_over_random_chunks() -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(2.5, 3.0, size=1000)
    cuts = sorted(rng.choice(np.arange(1, 1000), size=20, replace=False))
    moments = RunningMoments()
    for chunk in np.split(data, cuts):
        mean, std = moments.update(torch.tensor(chunk))
        assert mean == pytest.approx(chunk.mean()) and std == pytest.approx(chunk.std(ddof=1))
    assert moments.count == 1000
    assert moments.mean == pytest.approx(data.mean(), rel=1e-12)
    assert moments.std == pytest.approx(data.std(ddof=1), rel=1e-10)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored == moments


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Steps = list[list[list[float]]]  # step -> rank -> that rank's scores


def _moments_rank(rank: int, port: int, chunks: Steps, out: dict[int, tuple[float, ...]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        moments = RunningMoments()
        for step in chunks:  # every rank updates with its own share of each step
            moments.update(torch.tensor(step[rank], dtype=torch.float64))
        out[rank] = (moments.count, moments.mean, moments.std)
    finally:
        dist.destroy_process_group()


def test_running_moments_all_reduce_across_two_ranks() -> None:
    rng = np.random.default_rng(5)
    steps = [[rng.normal(1.0, 2.0, size=int(rng.integers(1, 9))).tolist() for _ in range(2)]
             for _ in range(6)]  # fmt: skip
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_moments_rank, args=(_free_port(), steps, out), nprocs=2, join=True)
    everything = np.array([x for step in steps for share in step for x in share])
    for rank in (0, 1):
        count, mean, std = out[rank]
        assert count == len(everything)
        assert mean == pytest.approx(everything.mean(), rel=1e-12)
        assert std == pytest.approx(everything.std(ddof=1), rel=1e-10)


def test_reward_scaling_normalisation_and_clipping() -> None:
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 3.0, 5.0, 7.0]))  # mean 4, std (Bessel) 2.582
    scores = torch.tensor([4.0, 10.0, -20.0])
    std = float(np.std([1.0, 3.0, 5.0, 7.0], ddof=1))
    torch.testing.assert_close(scale_by_std(scores, moments), scores / std)
    torch.testing.assert_close(normalize(scores, moments), (scores - 4.0) / std)
    torch.testing.assert_close(clip_rewards(scores, 5.0), torch.tensor([4.0, 5.0, -5.0]))


def test_kl_penalty_on_every_token_and_score_on_the_last() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, 0.0]])
    mask = ragged_mask([3, 2], 3)
    rewards = kl_penalized_rewards(torch.tensor([10.0, 20.0]), logp, ref, mask, beta=0.1)
    expected = torch.tensor([[-0.05, 0.1, 10.0], [-0.1, 20.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_kl_controllers() -> None:
    fixed = FixedKLController(0.02)
    fixed.update(kl=100.0, n_samples=128)
    assert fixed.beta == 0.02
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    adaptive.update(kl=12.0, n_samples=100)  # error clipped to +0.2
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    adaptive.update(kl=4.5, n_samples=100)  # error -0.25 clipped to -0.2
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.002) * (1 - 0.002))
    adaptive.update(kl=6.6, n_samples=1000)  # error 0.1
    assert adaptive.beta == pytest.approx(0.1 * (1.002) * (0.998) * (1 + 0.1 * 0.1))
    copy = AdaptiveKLController(1.0, 6.0, 10000)
    copy.load_state_dict(adaptive.state_dict())
    assert copy.beta == adaptive.beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_and_entropy_match_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen).to(dtype)
    tokens = torch.randint(0, 11, (2, 5), generator=gen)
    full = torch.log_softmax(logits.float(), dim=-1)
    picked = full.gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tokens), picked)
    expected = torch.distributions.Categorical(logits=logits.float()).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_logprobs_entropy_and_gradient_match_autograd(dtype: torch.dtype) -> None:
    """`token_logprobs_and_entropy` (blocks of positions, a hand-written backward) against
    log_softmax and Categorical under autograd: values, entropy, and the logits' gradient, over
    a number of positions that is no multiple of the block, with large logits."""
    gen = torch.Generator().manual_seed(1)
    positions = 3 * LOGPROB_BLOCK + 1
    base = (torch.randn(positions, 37, generator=gen) * 30).view(1, positions, 37).to(dtype)
    tokens = torch.randint(0, 37, (1, positions), generator=gen)
    weights = torch.randn(1, positions, generator=gen)
    ours_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    logprobs, entropy = token_logprobs_and_entropy(ours_in, tokens, with_entropy=True)
    full = torch.log_softmax(ref_in.float(), dim=-1)
    expected = full.gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logprobs, expected)
    assert entropy is not None and not entropy.requires_grad
    reference = torch.distributions.Categorical(logits=base.float()).entropy()
    torch.testing.assert_close(entropy, reference, rtol=1e-4, atol=1e-4)
    (logprobs * weights).sum().backward()
    (expected * weights).sum().backward()
    assert ours_in.grad is not None and ref_in.grad is not None
    assert ours_in.grad.dtype == dtype
    torch.testing.assert_close(ours_in.grad, ref_in.grad)
    assert token_logprobs_and_entropy(base, tokens)[1] is None


def test_kl_estimators() -> None:
    gen = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(3, 6, generator=gen) * 3, -torch.rand(3, 6, generator=gen) * 3
    torch.testing.assert_close(kl_k1(logp, ref), logp - ref)
    d = ref - logp
    torch.testing.assert_close(kl_k3(logp, ref), torch.exp(d) - d - 1)
    assert (kl_k3(logp, ref) >= 0).all()
    assert kl_k3(logp, logp).abs().max() == 0
    # Both estimate KL(p || q) without bias: sample from p and compare with the exact value.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())
    draws = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    lp, lq = p.log()[draws], q.log()[draws]
    assert float(kl_k1(lp, lq).mean()) == pytest.approx(exact, abs=0.01)
    assert float(kl_k3(lp, lq).mean()) == pytest.approx(exact, abs=0.01)


def surrogate_loop(logp: list[float], old: list[float], adv: list[float], clip: float) -> float:
    total = 0.0
    for lp, lo, a in zip(logp, old, adv, strict=True):
        ratio = math.exp(lp - lo)
        total += -min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
    return total


def test_clipped_surrogate_matches_a_loop_and_counts_clipped_tokens() -> None:
    gen = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 4, generator=gen)
    old = logp + 0.4 * torch.randn(3, 4, generator=gen)
    adv = torch.randn(3, 4, generator=gen)
    mask = ragged_mask([4, 2, 3], 4)
    loss, clipped = clipped_surrogate(logp, old, adv, mask, clip=0.2)
    expected, count = 0.0, 0
    for b, n in enumerate([4, 2, 3]):
        lp, lo = logp[b, :n].tolist(), old[b, :n].tolist()
        expected += surrogate_loop(lp, lo, adv[b, :n].tolist(), 0.2)
        for a, o, adv_t in zip(lp, lo, adv[b, :n].tolist(), strict=True):
            ratio = math.exp(a - o)  # clipped: the clipped term is the one min() picks, strictly
            count += -min(max(ratio, 0.8), 1.2) * adv_t > -ratio * adv_t
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(clipped) == count


def test_clipped_surrogate_gradient_is_zero_outside_the_trust_region() -> None:
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]])  # ratio e ≈ 2.7 > 1.2
    loss, _ = clipped_surrogate(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    loss.backward()  # type: ignore[no-untyped-call]
    assert logp.grad is not None
    # A > 0 and ratio above 1 + ε: clipped, no gradient; A < 0: the unclipped term wins.
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0


def test_clipped_value_loss_matches_a_loop() -> None:
    values = torch.tensor([[1.0, 0.0, 3.0]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, -1.0, 0.0]])
    mask = ragged_mask([3], 3)
    loss = clipped_value_loss(values, old, returns, mask, clip=0.2)
    expected = 0.0
    for v, o, r in zip([1.0, 0.0, 3.0], [0.5] * 3, [2.0, -1.0, 0.0], strict=True):
        bounded = o + min(max(v - o, -0.2), 0.2)
        expected += 0.5 * max((v - r) ** 2, (bounded - r) ** 2)
    assert float(loss) == pytest.approx(expected)
    plain = clipped_value_loss(values, old, returns, mask, clip=None)
    assert float(plain) == pytest.approx(0.5 * (1.0 + 1.0 + 9.0))


def test_approx_kl_is_zero_on_policy_and_positive_off() -> None:
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    assert float(approx_kl(logp, logp, mask)) == 0
    assert float(approx_kl(logp, logp - 0.3, mask)) > 0


def test_grpo_on_one_update_takes_pi_old_from_the_loss_pass_itself() -> None:
    """One optimizer step per rollout (GRPO without an old-logprob pass): the ratio against
    the loss pass's own logprobs, detached, is 1 and gives the plain policy gradient -A per
    token, the same loss and gradient as a separate π_old pass of the same policy."""
    gen = torch.Generator().manual_seed(5)
    values = -torch.rand(2, 3, generator=gen)
    adv = torch.tensor([1.5, -0.5])
    mask = ragged_mask([3, 2], 3)
    grads = []
    for separate_pass in (False, True):
        logp = values.clone().requires_grad_(True)
        old = values.clone() if separate_pass else logp.detach()
        per_token, clipped_tokens = grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.0)
        loss, clipped = per_token.sum(), clipped_tokens.sum()
        loss.backward()  # type: ignore[no-untyped-call]
        assert float(clipped) == 0
        assert float(loss.detach()) == pytest.approx(-float((adv.unsqueeze(-1) * mask).sum()))
        assert logp.grad is not None
        grads.append(logp.grad)
    assert torch.equal(grads[0], -adv.unsqueeze(-1) * mask)
    assert torch.equal(grads[0], grads[1])


def test_grpo_loss_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(4)
    logp = -torch.rand(2, 3, generator=gen)
    old = logp + 0.3 * torch.randn(2, 3, generator=gen)
    ref = logp + 0.5 * torch.randn(2, 3, generator=gen)
    adv = torch.tensor([1.5, -0.5])
    mask = ragged_mask([3, 2], 3)
    per_token, _ = grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.04)
    loss = per_token.sum()
    assert per_token[1, 2] == 0  # padding
    expected = 0.0
    for b, n in enumerate([3, 2]):
        for t in range(n):
            ratio = math.exp(float(logp[b, t] - old[b, t]))
            a = float(adv[b])
            surrogate = -min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
            d = float(ref[b, t] - logp[b, t])
            expected += surrogate + 0.04 * (math.exp(d) - d - 1)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    no_kl, _ = grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.0)
    with_ref, _ = grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.0)
    torch.testing.assert_close(no_kl, with_ref)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        grpo_loss(logp, old, None, adv, mask, clip=0.2, beta=0.1)
