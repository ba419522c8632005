"""SFT under `torchrun --nproc-per-node 2` on the tiny model and the animal-sounds fixtures.

One uninterrupted run (module fixture) serves the learning, accuracy and resume checks; a second
run is killed with SIGKILL right after its first checkpoint, restarted, and must end where the
uninterrupted run ended.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kill_tree import kill_when, logged_step, start_in_own_group
from rlhf_trainer.config import (
    WORKSPACE_ENV,
    DatasetSpec,
    Hyperparameters,
    ModelSource,
    StageConfig,
)
from rlhf_trainer.runtime import checkpoint
from rlhf_trainer.tasks import animal_sounds as tasks

pytestmark = pytest.mark.integration

NPROC = 2
SAVE_EVERY = 25
HYPERPARAMETERS = Hyperparameters(
    max_steps=100,
    batch_size=16,
    gradient_accumulation=2,
    learning_rate=3e-3,
    warmup_steps=5,
    lr_scheduler="cosine",
    save_every=SAVE_EVERY,
    keep_checkpoints=2,
    log_every=5,
    seed=7,
)


@dataclass
class Run:
    output_dir: Path
    stderr: str
    seconds: float

    def metrics(self) -> list[dict[str, Any]]:
        lines = (self.output_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def write_config(workspace: Path, name: str, model: Path, dataset: Path, **changes: Any) -> Path:
    """A stage config like the operator renders, with paths relative to the workspace."""
    config = StageConfig(
        run="it",
        stage=name,
        type="sft",
        model=ModelSource(path=str(model)),
        dataset=DatasetSpec(path=str(dataset)),
        output_dir=f"runs/{name}",
        hyperparameters=HYPERPARAMETERS.model_copy(update=changes),
    )
    path = workspace / f"{name}.yaml"
    path.write_text(config.to_yaml())
    return path


def env_for(workspace: Path) -> dict[str, str]:
    return {**os.environ, WORKSPACE_ENV: str(workspace), "PYTHONUNBUFFERED": "1"}


def torchrun(config: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(NPROC), "-m", "rlhf_trainer", "sft", "--config", str(config),
    ]  # fmt: skip


def run_torchrun(workspace: Path, config: Path, name: str) -> Run:
    start = time.perf_counter()
    proc = subprocess.run(
        torchrun(config), env=env_for(workspace), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Run(workspace / "runs" / name, proc.stderr, time.perf_counter() - start)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def full_run(workspace: Path, tiny_model_dir: Path, fixtures_dir: Path) -> Run:
    config = write_config(workspace, "full", tiny_model_dir, fixtures_dir / "sft.jsonl")
    return run_torchrun(workspace, config, "full")


def test_loss_falls_and_progress_is_reported(full_run: Run) -> None:
    metrics = full_run.metrics()
    steps = [m["step"] for m in metrics]
    assert steps == list(range(5, 101, 5))
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    drop = 1 - last / first
    print(f"loss {first:.4f} -> {last:.4f} ({drop:.0%} lower) in {full_run.seconds:.1f}s")
    assert drop >= 0.30
    for key in ("learning_rate", "tokens_per_s", "grad_norm"):
        assert all(m[key] > 0 for m in metrics), key
    # Response tokens scored per step (at least each row's EOS), fewer than the batch holds.
    batch = HYPERPARAMETERS.batch_size
    assert all(batch <= m["trained_tokens"] < batch * HYPERPARAMETERS.max_length for m in metrics)
    progress = json.loads((full_run.output_dir / "progress.json").read_text())
    assert progress["step"] == progress["totalSteps"] == 100
    assert set(progress["metrics"]) == {"loss", "learningRate", "tokensPerSecond"}
    assert progress["metrics"]["loss"] == pytest.approx(last)
    assert progress["updatedAt"].endswith("+00:00")
    assert [p.name for p in (full_run.output_dir / "checkpoints").iterdir()] != []
    kept = sorted(p.name for p in (full_run.output_dir / "checkpoints").iterdir())
    assert kept == ["step-50", "step-75"]  # keepCheckpoints: 2


def test_greedy_answers_of_final_model(full_run: Run, fixtures_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = full_run.output_dir / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model: Any = AutoModelForCausalLM.from_pretrained(final)  # transformers types are partial
    model.eval()
    rows = [json.loads(line) for line in (fixtures_dir / "sft_eval.jsonl").read_text().splitlines()]
    train_prompts = {
        json.loads(line)["prompt"] for line in (fixtures_dir / "sft.jsonl").read_text().splitlines()
    }
    assert not train_prompts & {r["prompt"] for r in rows}
    scores = []
    for row in rows:
        inputs = tokenizer(row["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        text = str(tokenizer.decode(new_tokens, skip_special_tokens=True))
        scores.append(tasks.check(row["prompt"], text))
    accuracy = sum(s == 1.0 for s in scores) / len(scores)
    print(f"greedy accuracy on {len(rows)} held-out prompts: {accuracy:.0%}")
    assert accuracy >= 0.8


def test_killed_run_resumes_and_matches(
    full_run: Run, workspace: Path, tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    """SIGKILL torchrun and both workers once a random step is logged; the restart resumes
    from the last complete checkpoint and reproduces the uninterrupted run."""
    config = write_config(workspace, "killed", tiny_model_dir, fixtures_dir / "sft.jsonl")
    out = workspace / "runs" / "killed"
    kill_at = random.Random().choice([30, 40, 50, 60, 70])
    print(f"sft: SIGKILL once step {kill_at} is logged")
    proc = start_in_own_group(torchrun(config), env_for(workspace))
    kill_when(proc, logged_step(out, kill_at))
    assert not (out / "final").exists()
    [(resume_at, _), *_] = reversed(checkpoint.list_checkpoints(out / "checkpoints"))
    assert resume_at % SAVE_EVERY == 0 and resume_at >= kill_at - SAVE_EVERY
    # A checkpoint cut short by a kill: resume must skip it and clean it up.
    partial = out / "checkpoints" / ".tmp-step-90"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a file")

    resumed = run_torchrun(workspace, config, "killed")
    assert f"Resumed from checkpoint step-{resume_at} at step {resume_at} " in resumed.stderr
    assert "Removed incomplete checkpoint .tmp-step-90" in resumed.stderr
    assert not partial.exists()
    steps = [m["step"] for m in resumed.metrics()]
    assert steps == sorted(set(steps)) == list(range(5, 101, 5))
    expected, got = full_run.metrics()[-1]["loss"], resumed.metrics()[-1]["loss"]
    diff = abs(got - expected)
    print(f"final loss uninterrupted {expected:.6f}, resumed {got:.6f}, diff {diff:.2e}")
    assert abs(got - expected) < 1e-4
    for a, b in zip(full_run.metrics(), resumed.metrics(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]


def bad_row_dataset(fixtures_dir: Path, workspace: Path) -> Path:
    lines = (fixtures_dir / "sft.jsonl").read_text().splitlines()
    row = json.loads(lines[6])
    del row["response"]
    lines[6] = json.dumps(row)
    path = workspace / "data" / "bad.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_plain(workspace: Path, config: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "rlhf_trainer", "sft", "--config", str(config)]
    return subprocess.run(cmd, env=env_for(workspace), capture_output=True, text=True, timeout=120)


def assert_one_error_line(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_row_and_missing_model_fail_cleanly(
    workspace: Path, tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    bad = bad_row_dataset(fixtures_dir, workspace)
    config = write_config(workspace, "badrow", tiny_model_dir, Path("data/bad.jsonl"))
    proc = run_plain(workspace, config)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "data/bad.jsonl line 7", 'missing field "response"')
    assert not (workspace / "runs" / "badrow").exists()

    config = write_config(workspace, "nomodel", workspace / "no-such-model", bad)
    proc = run_plain(workspace, config)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, str(workspace / "no-such-model"), "tiny-model")
    assert not (workspace / "runs" / "nomodel").exists()


def test_bad_row_under_torchrun_reports_once(
    workspace: Path, tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    bad_row_dataset(fixtures_dir, workspace)
    config = write_config(workspace, "badrow-tr", tiny_model_dir, Path("data/bad.jsonl"))
    proc = subprocess.run(
        torchrun(config), env=env_for(workspace), capture_output=True, text=True, timeout=120
    )
    # torchrun itself exits 1 with its own failure summary; the workers exit 2 and only rank 0
    # prints the error line (rank 1 waits for it and is stopped by torchrun).
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        'error: data/bad.jsonl line 7: missing field "response"; '
        'each row needs {"prompt", "response"}'
    ]
    assert not (workspace / "runs" / "badrow-tr").exists()


def test_resume_after_completion_does_nothing(full_run: Run, workspace: Path) -> None:
    before = (full_run.output_dir / "final" / "model.safetensors").stat().st_mtime_ns
    shutil.copy(full_run.output_dir / "metrics.jsonl", workspace / "metrics.before")
    proc = run_plain(workspace, workspace / "full.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "the stage is complete" in proc.stderr
    assert (full_run.output_dir / "final" / "model.safetensors").stat().st_mtime_ns == before
    assert (full_run.output_dir / "metrics.jsonl").read_text() == (
        workspace / "metrics.before"
    ).read_text()
