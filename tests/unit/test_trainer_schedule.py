"""LR schedule against a step-by-step reference, and total-step arithmetic."""

from __future__ import annotations

import math

import pytest

from rlhf_trainer.preflight import total_steps
from rlhf_trainer.runtime.schedule import ScheduleKind, lr_factor

pytestmark = pytest.mark.unit


def reference(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    remaining = total - warmup
    done = step - warmup
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return (remaining - done) / remaining
    return (1 + math.cos(math.pi * done / remaining)) / 2


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (5, 6), (10, 100)])
def test_matches_reference(kind: ScheduleKind, warmup: int, total: int) -> None:
    got = [lr_factor(s, warmup_steps=warmup, total_steps=total, kind=kind) for s in range(total)]
    want = [reference(s, warmup, total, kind) for s in range(total)]
    assert got == pytest.approx(want, abs=1e-12)
    assert all(0 < f <= 1 for f in got)  # no step runs at lr 0, none above the peak


def test_shape_of_each_schedule() -> None:
    def f(step: int, kind: ScheduleKind) -> float:
        return lr_factor(step, warmup_steps=4, total_steps=20, kind=kind)

    assert [f(s, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, "cosine") == f(4, "linear") == f(19, "constant") == 1.0
    assert f(12, "cosine") == pytest.approx(0.5)  # halfway through the decay
    assert f(12, "linear") == pytest.approx(0.5)
    decay = [f(s, "cosine") for s in range(4, 20)]
    assert decay == sorted(decay, reverse=True)


def test_total_steps() -> None:
    assert total_steps(7, 3.0, 400, 16) == 7
    assert total_steps(None, 1.0, 400, 16) == 25
    assert total_steps(None, 1.0, 401, 16) == 26
    assert total_steps(None, 0.1, 30, 3) == 1  # 0.1 * 30 / 3 is 1.0000000000000002 in floats
    assert total_steps(None, 0.01, 10, 16) == 1
