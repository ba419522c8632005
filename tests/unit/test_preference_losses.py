"""Preference losses against naive step-by-step references, over shapes and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_trainer.algos.losses import (
    IGNORE_INDEX,
    bradley_terry_loss,
    dpo_loss,
    pairwise_accuracy,
    rrhf_loss,
    sequence_logprobs,
)
from rlhf_trainer.evaluate.stage import token_kl
from rlhf_trainer.models.reward_model import last_token_values

pytestmark = pytest.mark.unit

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
SHAPES = [(1, 2, 3), (2, 7, 11), (4, 16, 50)]


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype != torch.bfloat16 else 1e-4


def logits_and_labels(b: int, t: int, v: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(b * 100 + t)
    logits = torch.randn(b, t, v, generator=gen).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.4] = IGNORE_INDEX
    return logits, labels


def log_softmax_at(row: torch.Tensor, index: int) -> float:
    row = row.double()
    return float(row[index] - torch.logsumexp(row, 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "t", "v"), SHAPES)
def test_sequence_logprobs_matches_a_loop(dtype: torch.dtype, b: int, t: int, v: int) -> None:
    logits, labels = logits_and_labels(b, t, v, dtype)
    logp, n = sequence_logprobs(logits, labels)
    assert logp.dtype == n.dtype == torch.float32 and logp.shape == n.shape == (b,)
    for i in range(b):
        total, count = 0.0, 0
        for pos in range(t - 1):
            target = int(labels[i, pos + 1])
            if target != IGNORE_INDEX:
                total += log_softmax_at(logits[i, pos], target)
                count += 1
        assert float(logp[i]) == pytest.approx(total, rel=tol(dtype), abs=tol(dtype))
        assert float(n[i]) == count


def naive_log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def scalars(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5, 64])
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_a_loop(dtype: torch.dtype, n: int, with_margin: bool) -> None:
    chosen, rejected = scalars(n, dtype, 1), scalars(n, dtype, 2)
    margin = scalars(n, dtype, 3).abs() if with_margin else None
    got = bradley_terry_loss(chosen, rejected, margin)
    assert got.dtype == torch.float32 and got.shape == (n,)
    for i in range(n):
        m = float(margin[i]) if margin is not None else 0.0
        want = -naive_log_sigmoid(float(chosen[i]) - float(rejected[i]) - m)
        assert float(got[i]) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_pairwise_accuracy_counts_ties_half() -> None:
    got = pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert got.tolist() == [1.0, 0.5, 0.0]


def naive_dpo(
    c: float, r: float, rc: float, rr: float, nc: float, nr: float, beta: float, kind: str,
    eps: float,
) -> float:  # fmt: skip
    h_c, h_r = c - rc, r - rr
    z = beta * (h_c - h_r)
    if kind == "sigmoid":
        return -(1 - eps) * naive_log_sigmoid(z) - eps * naive_log_sigmoid(-z)
    if kind == "hinge":
        return max(0.0, 1 - z)
    return (h_c / nc - h_r / nr - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 32])
@pytest.mark.parametrize(
    ("kind", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_a_loop(
    dtype: torch.dtype, n: int, kind: str, eps: float, beta: float
) -> None:
    logps = [scalars(n, dtype, s) * 5 - 20 for s in range(4)]
    lengths = [
        torch.randint(1, 30, (n,), generator=torch.Generator().manual_seed(s)) for s in (7, 8)
    ]
    out = dpo_loss(
        *logps, beta=beta, loss_type=kind, label_smoothing=eps,
        chosen_lengths=lengths[0], rejected_lengths=lengths[1],
    )  # fmt: skip
    assert out.losses.shape == (n,) and out.losses.dtype == torch.float32
    for i in range(n):
        c, r, rc, rr = (float(x[i]) for x in logps)
        want = naive_dpo(c, r, rc, rr, float(lengths[0][i]), float(lengths[1][i]), beta, kind, eps)
        assert float(out.losses[i]) == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert float(out.chosen_rewards[i]) == pytest.approx(beta * (c - rc), rel=1e-5, abs=1e-5)
        assert float(out.rejected_rewards[i]) == pytest.approx(beta * (r - rr), rel=1e-5, abs=1e-5)


def test_dpo_loss_refuses_ipo_without_lengths_and_unknown_types() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")


def test_dpo_gradient_pushes_chosen_up_and_rejected_down() -> None:
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    ref = torch.tensor([-5.0])
    loss = dpo_loss(chosen, rejected, ref, ref, beta=0.1).losses.sum()
    loss.backward()  # type: ignore[no-untyped-call]
    assert chosen.grad is not None and rejected.grad is not None
    assert float(chosen.grad) < 0 < float(rejected.grad)


def naive_rrhf(
    logps: list[float], lengths: list[float], rewards: list[float], alpha: float
) -> tuple[float, float]:
    scores = [lp / ln**alpha for lp, ln in zip(logps, lengths, strict=True)]
    rank = 0.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if rewards[i] < rewards[j]:
                rank += max(0.0, scores[i] - scores[j])
    best = max(range(len(rewards)), key=lambda k: (rewards[k], -k))
    return rank, -logps[best] / lengths[best]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(1, 2), (3, 4), (8, 5)])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_rrhf_loss_matches_a_loop(dtype: torch.dtype, n: int, k: int, alpha: float) -> None:
    gen = torch.Generator().manual_seed(n * 10 + k)
    logps = (-torch.rand(n, k, generator=gen) * 20).to(dtype)
    lengths = torch.randint(1, 12, (n, k), generator=gen).float()
    rewards = torch.randint(0, 3, (n, k), generator=gen).float() / 2  # ties are common
    counts = [max(2, k - (i % 2)) for i in range(n)]  # some queries have fewer responses
    valid = torch.tensor([[j < c for j in range(k)] for c in counts])
    out = rrhf_loss(logps, lengths, rewards, length_penalty=alpha, valid=valid)
    assert out.rank.shape == out.sft.shape == (n,)
    for i, c in enumerate(counts):
        rank, sft = naive_rrhf(
            [float(x) for x in logps[i, :c]], lengths[i, :c].tolist(), rewards[i, :c].tolist(),
            alpha,
        )  # fmt: skip
        assert float(out.rank[i]) == pytest.approx(rank, rel=1e-4, abs=1e-4)
        assert float(out.sft[i]) == pytest.approx(sft, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "t", "v"), SHAPES)
def test_token_kl_matches_a_loop(dtype: torch.dtype, b: int, t: int, v: int) -> None:
    logits, labels = logits_and_labels(b, t, v, dtype)
    ref = (logits.float() + torch.randn(b, t, v, generator=torch.Generator().manual_seed(3))).to(
        dtype
    )
    got = token_kl(logits, ref, labels)
    for i in range(b):
        want = 0.0
        for pos in range(t - 1):
            if int(labels[i, pos + 1]) == IGNORE_INDEX:
                continue
            p = torch.log_softmax(logits[i, pos].double(), 0)
            q = torch.log_softmax(ref[i, pos].double(), 0)
            want += float((p.exp() * (p - q)).sum())
        assert float(got[i]) == pytest.approx(want, rel=tol(dtype) * 10, abs=tol(dtype) * 10)
    assert float(token_kl(logits, logits, labels).abs().max()) < 1e-4


@pytest.mark.parametrize("left", [False, True])
def test_last_token_values_reads_the_last_real_token(left: bool) -> None:
    values = torch.arange(12.0).reshape(3, 4)
    lengths = [4, 2, 1]
    mask = torch.zeros(3, 4, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, 4 - n :] = 1
        else:
            mask[i, :n] = 1
    got = last_token_values(values, mask).tolist()
    want = [float(values[i, 3 if left else n - 1]) for i, n in enumerate(lengths)]
    assert got == want
