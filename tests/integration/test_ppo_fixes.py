"""A PPO stage whose reward function gives every sample the same reward (issue 25, item 1),
under torchrun, generating in the trainer's own process (`rollout.engine: trainer`, no
server), on the random tiny model.

Reward scaling divided such rewards by a running std of 0 (floored at 1e-8), which turned a
reward of 2.5 into 2.5e8 and the value and policy losses with it. Checked here: every metric
of every step is finite, the rewards, values and losses stay bounded, and the trainer warns
that the step carries no reward signal, with the default switches and with reward
normalisation, advantage whitening and two PPO epochs (no folded critic pass).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_online_vllm import env_for, torchrun, write

from rlhf_trainer.rewards.functions import ALLOW_ENV

pytestmark = pytest.mark.integration

REWARD = 2.5
STEPS = 3
MODULE = "constant_reward_fn"
BOUND = 20.0  # |reward_scaled_mean|, value and policy losses; before the fix: ~1e8


def constant_workspace(root: Path, fixtures_dir: Path) -> dict[str, str]:
    """The prompts, a reward module that returns REWARD whatever the sample, and the
    environment that lets the trainer import it."""
    data = root / "data"
    data.mkdir(parents=True)
    (data / "prompts.jsonl").write_text((fixtures_dir / "prompts.jsonl").read_text())
    code = root / "code"
    code.mkdir()
    (code / f"{MODULE}.py").write_text(
        f"def constant(prompt: str, response: str) -> float:\n    return {REWARD}\n"
    )
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)
    return {**env_for(root), "PYTHONPATH": path, ALLOW_ENV: MODULE}


@pytest.mark.parametrize(
    "options",
    [{}, {"rewardNormalization": True, "advantageWhitening": True, "ppoEpochs": 2}],
    ids=["defaults", "normalised-whitened"],
)
def test_a_constant_reward_gives_finite_bounded_metrics_and_a_warning(
    tmp_path: Path, tiny_model_dir: Path, fixtures_dir: Path, options: dict[str, Any]
) -> None:
    env = constant_workspace(tmp_path, fixtures_dir)
    config = {
        "run": "it", "stage": "ppo", "type": "ppo", "model": {"path": str(tiny_model_dir)},
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts", "evalFraction": 0.1},
        "outputDir": "it/ppo", "rewardFunction": f"{MODULE}:constant",
        "rollout": {"engine": "trainer", "servedModel": "policy"},
        "hyperparameters": {"maxSteps": STEPS, "batchSize": 4, "learningRate": 1e-4,
                            "maxLength": 64, "seed": 0},
        "ppo": {"rolloutBatchSize": 8, "maxNewTokens": 6, "criticLearningRate": 1e-3,
                **options},
    }  # fmt: skip
    proc = subprocess.run(torchrun("ppo", write(tmp_path, config), 1), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = (tmp_path / "it" / "ppo" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    steps = [m for m in rows if m["step"] > 0 and "value_loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float | int):
                assert math.isfinite(value), (key, row)
    for m in steps:
        assert m["reward_mean"] == REWARD and m["reward_std"] == 0.0
        for key in ("reward_scaled_mean", "value_loss", "policy_loss", "loss", "kl"):
            assert abs(m[key]) < BOUND, (key, m)
    warned = [f"Every reward of step {s} was {REWARD:.4g}:" in proc.stderr for s in range(STEPS)]
    assert all(warned), proc.stderr[-3000:]


def test_grpo_warns_when_every_reward_of_a_step_is_equal(
    tmp_path: Path, tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    """Equal rewards make every group-relative advantage 0: the step learns nothing, and the
    log says so instead of reporting a loss of 0 as if all were well."""
    env = constant_workspace(tmp_path, fixtures_dir)
    config = {
        "run": "it", "stage": "grpo", "type": "grpo", "model": {"path": str(tiny_model_dir)},
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
        "outputDir": "it/grpo", "rewardFunction": f"{MODULE}:constant",
        "rollout": {"engine": "trainer", "servedModel": "policy"},
        "hyperparameters": {"maxSteps": 2, "batchSize": 8, "maxLength": 64, "seed": 0},
        "grpo": {"numGenerations": 2, "rolloutBatchSize": 4, "maxNewTokens": 4},
    }  # fmt: skip
    proc = subprocess.run(torchrun("grpo", write(tmp_path, config), 1), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    for step in (1, 2):
        assert f"Every reward of step {step} was {REWARD:.4g}: every advantage is 0" in (
            proc.stderr
        ), proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "it" / "grpo" / "metrics.jsonl").open()]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
