"""GRPO, PPO and online RRHF generating in the trainer's own process (`rollout.engine: trainer`),
under torchrun, with no server at all.

The policy is test_online_vllm.py's weak SFT policy (half the animals mislabelled 60% of the
time). Checked here, with the same learning bound as the server runs:

- GRPO on 2 FSDP ranks (rank 0 generates from the weights gathered off the shards after every
  step) and PPO in 1 process (the decoder reads the live, unsharded weights) raise the mean
  reward of greedy answers to held-out prompts by a clear margin;
- every parity probe finds the decoder and the training forward equal to float rounding (the
  same weights in the same dtype; a server in float32 is ~1e-7 off too, in bfloat16 ~1e-2);
- the trainer says which decoder it used (the fused Llama one for this model), and PPO and GRPO
  take π_old from the samples' own logprobs (no extra forward pass);
- online RRHF runs on the engine too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_online_vllm import (
    HELD_OUT,
    MIN_GAIN,
    env_for,
    held_out_gain,
    torchrun,
    write,
)

pytestmark = pytest.mark.integration

IN_TRAINER = {"engine": "trainer", "servedModel": "policy"}


def run(policy: tuple[Path, Path], stage: str, options: dict[str, Any], nproc: int,
        **hp: Any) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    """The stage's metrics.jsonl rows and its log."""
    workspace, model = policy
    algo = stage.split("-")[0]
    config = {
        "run": "it", "stage": stage, "type": algo, "model": {"path": str(model)},
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts", "evalFraction": HELD_OUT},
        "outputDir": f"it/{stage}", "rewardFunction": "animal_sounds", "rollout": IN_TRAINER,
        "hyperparameters": {"learningRate": 5e-4, "maxLength": 64, "seed": 0, **hp},
        algo: options,
    }  # fmt: skip
    proc = subprocess.run(torchrun(algo, write(workspace, config), nproc),
                          env=env_for(workspace), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = workspace / "it" / stage
    assert (out / "final" / "model.safetensors").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], proc.stderr


def check_engine(metrics: list[dict[str, Any]], log: str) -> None:
    steps = [m for m in metrics if m["step"] > 0]
    assert steps and all(m["logprob_mismatch"] < 1e-4 for m in steps)
    assert "Generating in the trainer's process (fused Llama decoder, torch.float32)" in log
    assert "Synced weights of step 1 to the trainer's engine (trainer" in log


def test_grpo_on_two_ranks_raises_held_out_greedy_reward(policy: tuple[Path, Path]) -> None:
    options = {"numGenerations": 8, "rolloutBatchSize": 16, "maxNewTokens": 8, "klCoef": 0.04}
    metrics, log = run(policy, "grpo", options, nproc=2, maxSteps=10, batchSize=32)
    before, after = held_out_gain(metrics)
    kl = max(m["kl"] for m in metrics if "kl" in m)
    print(f"grpo (engine: trainer): held-out greedy reward {before:.3f} -> {after:.3f}, "
          f"max per-token KL {kl:.3f}")  # fmt: skip
    assert after - before >= MIN_GAIN
    assert kl < 1.0
    check_engine(metrics, log)


def test_ppo_in_one_process_raises_held_out_greedy_reward(policy: tuple[Path, Path]) -> None:
    options = {"rolloutBatchSize": 64, "maxNewTokens": 8, "temperature": 1.0, "topP": 1.0,
               "criticLearningRate": 1e-3}  # fmt: skip
    metrics, log = run(policy, "ppo", options, nproc=1, maxSteps=10, batchSize=32,
                       adamBetas=[0.9, 0.95])  # fmt: skip
    before, after = held_out_gain(metrics)
    kl = max(m["kl"] for m in metrics if "kl" in m)
    print(f"ppo (engine: trainer): held-out greedy reward {before:.3f} -> {after:.3f}, "
          f"max sequence KL {kl:.3f}")  # fmt: skip
    assert after - before >= MIN_GAIN
    assert kl < 2.0
    check_engine(metrics, log)


def test_ppo_takes_pi_old_from_the_samples_own_logprobs(policy: tuple[Path, Path]) -> None:
    """With one minibatch per step the policy has not moved when the loss runs, so a π_old
    that is the policy's own logprobs of the sampled tokens gives a ratio of 1 on every token:
    nothing clipped, an approx-KL of float rounding. Logprobs of the wrong tokens, positions or
    weights would not."""
    options = {"rolloutBatchSize": 32, "maxNewTokens": 8, "criticLearningRate": 1e-3}
    metrics, log = run(policy, "ppo-one", options, nproc=1, maxSteps=2, batchSize=32)
    check_engine(metrics, log)
    for m in (m for m in metrics if m["step"] > 0):
        assert m["approx_kl"] < 1e-6 and m["clip_fraction"] == 0.0, m


def test_online_rrhf_runs_on_the_engine(policy: tuple[Path, Path]) -> None:
    options = {"online": True, "samplesPerPrompt": 4, "rolloutBatchSize": 8, "maxNewTokens": 8}
    metrics, log = run(policy, "rrhf", options, nproc=1, maxSteps=4, batchSize=8)
    assert [m["step"] for m in metrics if m["step"] > 0] == [1, 2, 3, 4]
    check_engine(metrics, log)
