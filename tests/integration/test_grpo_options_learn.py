"""GRPO's 2025 options learn the tiny task: the weak SFT policy of test_online_vllm.py (half
the animals mislabelled 60% of the time), the animal_sounds reward, generation in the trainer's
process (`rollout.engine: trainer`, no server), one process to spare the CI's cores.

- dynamicSampling, clipHigh 0.28, lossAggregation seq-mean-token-sum-norm (Dr.GRPO) and
  advantageEstimator rloo, one run each: the held-out greedy reward rises by MIN_GAIN; with
  dynamic sampling, groups with equal rewards are dropped and refilled in extra rounds;
- reinforce++ (the k1 KL in the reward, a reference loaded) with overlongPenalty: a short run
  with finite metrics that counts the penalised responses.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from test_online_engine import check_engine, run
from test_online_vllm import (
    MIN_GAIN,
    held_out_gain,
)

pytestmark = pytest.mark.integration

# As test_online_engine's GRPO run, on one rank.
STEP = {"numGenerations": 8, "rolloutBatchSize": 16, "maxNewTokens": 8}
HP = {"maxSteps": 10, "batchSize": 32}


def steps(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in metrics if m["step"] > 0]


@pytest.mark.parametrize(
    ("stage", "options"),
    [
        ("grpo-dynamic", {"dynamicSampling": True}),
        ("grpo-cliphigh", {"clipHigh": 0.28}),
        ("grpo-drgrpo", {"lossAggregation": "seq-mean-token-sum-norm"}),
        ("grpo-rloo", {"advantageEstimator": "rloo"}),
    ],
)
def test_option_learns(policy: tuple[Path, Path], stage: str, options: dict[str, Any]) -> None:
    metrics, log = run(policy, stage, STEP | options, nproc=1, **HP)
    before, after = held_out_gain(metrics)
    print(f"{stage}: held-out greedy reward {before:.3f} -> {after:.3f}")
    assert after - before >= MIN_GAIN
    check_engine(metrics, log)
    if options.get("dynamicSampling"):
        trained = steps(metrics)
        assert sum(m["groups_dropped"] for m in trained) > 0
        assert sum(m["sampling_rounds"] for m in trained) > 0
        assert all(0 < m["groups_kept"] <= STEP["rolloutBatchSize"] for m in trained)


def test_reinforce_pp_with_overlong_penalty_runs(policy: tuple[Path, Path]) -> None:
    options = STEP | {"advantageEstimator": "reinforce++", "klCoef": 0.05,
                      "overlongPenalty": {"buffer": 4, "factor": 0.5}}  # fmt: skip
    metrics, log = run(policy, "grpo-rpp", options, nproc=1, maxSteps=3, batchSize=32)
    trained = steps(metrics)
    assert [m["step"] for m in trained] == [1, 2, 3]
    for m in trained:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert m["overlong_penalised"] >= 0 and m["kl"] >= 0
    check_engine(metrics, log)
