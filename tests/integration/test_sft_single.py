"""SFT as a plain process (a 1-rank gloo group made by the trainer itself), with a held-out
split, then resumed from its checkpoint on 2 ranks: the checkpoint reshards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_trainer.config import (
    WORKSPACE_ENV,
    DatasetSpec,
    Hyperparameters,
    ModelSource,
    StageConfig,
)

pytestmark = pytest.mark.integration


def test_plain_process_with_eval_then_resume_on_two_ranks(
    tmp_path: Path, tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    config = StageConfig(
        run="single",
        stage="sft",
        type="sft",
        model=ModelSource(path=str(tiny_model_dir)),
        dataset=DatasetSpec(path=str(fixtures_dir / "sft.jsonl"), eval_fraction=0.1),
        output_dir="out",
        hyperparameters=Hyperparameters(
            max_steps=6, batch_size=8, learning_rate=1e-3, save_every=3, log_every=2, seed=3
        ),
    )
    path = tmp_path / "sft.yaml"
    path.write_text(config.to_yaml())
    env = {**os.environ, WORKSPACE_ENV: str(tmp_path)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = ["-m", "rlhf_trainer", "sft", "--config", str(path)]
    proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "world size 1" in proc.stderr
    assert "on 360 examples (40 held out)" in proc.stderr
    out = tmp_path / "out"
    single = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in single] == [2, 3, 4, 6]
    assert [m["step"] for m in single if "eval_loss" in m] == [3, 6]
    assert all(m["eval_loss"] > 0 for m in single if "eval_loss" in m)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]

    # Same stage on 2 ranks from the 1-rank checkpoint: it must reshard and land on the same loss.
    shutil.rmtree(out / "final")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    proc = subprocess.run([*torchrun, "2", *cmd], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Resumed from checkpoint step-3 at step 3 " in proc.stderr
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [2, 3, 4, 6]
    for a, b in zip(single, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), abs=1e-4)
    assert (out / "final" / "model.safetensors").is_file()


def test_a_batch_too_long_for_memory_is_warned_about_before_the_first_step(
    tmp_path: Path, tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    """256 rows of up to 2^20 tokens a micro-step cannot fit in any machine's memory: the trainer
    says so, naming the fields to change, before step 1; the fixture's short rows still train."""
    config = StageConfig(
        run="single", stage="sft", type="sft", model=ModelSource(path=str(tiny_model_dir)),
        dataset=DatasetSpec(path=str(fixtures_dir / "sft.jsonl")), output_dir="out",
        hyperparameters=Hyperparameters(max_steps=1, batch_size=256, max_length=2**20),
    )  # fmt: skip
    path = tmp_path / "sft.yaml"
    path.write_text(config.to_yaml())
    env = {**os.environ, WORKSPACE_ENV: str(tmp_path)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "rlhf_trainer", "sft", "--config", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    warning = proc.stderr.index("WARNING hyperparameters: a micro-batch of 256 rows x 1048576")
    assert warning < proc.stderr.index("Step 1/1")
    assert "Lower hyperparameters.batchSize" in proc.stderr
