"""End to end: re-running a finished run whose stage inputs changed stops before training and
names the changed fields; `rlhf run --restart STAGE` moves the old outputs aside and trains
again (rlhf_trainer/runtime/stage_inputs.py, rlhf_operator/restart.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

RLHF = [sys.executable, "-m", "rlhf_operator.cli"]


def write_spec(path: Path, max_steps: int, learning_rate: float) -> Path:
    spec = {
        "apiVersion": "rlhf.dev/v1alpha1",
        "kind": "RLHFRun",
        "metadata": {"name": "rerun"},
        "spec": {
            "model": {"path": "models/tiny-llama"},
            "trainer": {"nprocPerNode": 1},
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "dataset": {"path": "data/sft.jsonl", "format": "jsonl"},
                    "hyperparameters": {
                        "maxSteps": max_steps,
                        "learningRate": learning_rate,
                        "batchSize": 4,
                        "maxLength": 32,
                        "saveEvery": 2,
                        "seed": 0,
                    },
                }
            ],
        },
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def rlhf_run(spec: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RLHF, "run", str(spec), "--workdir", str(workdir), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


def weights_digest(final: Path) -> str:
    return hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest()


def test_changed_inputs_refuse_and_restart_retrains(
    tiny_model_dir: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    (workdir / "data").mkdir(parents=True)
    shutil.copy(fixtures_dir / "sft.jsonl", workdir / "data" / "sft.jsonl")
    shutil.copytree(tiny_model_dir, workdir / "models" / "tiny-llama")
    spec = write_spec(tmp_path / "run.yaml", max_steps=3, learning_rate=1e-3)
    stage_dir = workdir / "rerun" / "sft"

    first = rlhf_run(spec, workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((stage_dir / "final" / "inputs.json").read_text())
    assert record["fields"]["hyperparameters.maxSteps"] == 3
    before = weights_digest(stage_dir / "final")

    again = rlhf_run(spec, workdir)  # unchanged: nothing retrains, the run succeeds
    assert again.returncode == 0, again.stderr[-3000:]
    assert weights_digest(stage_dir / "final") == before

    write_spec(spec, max_steps=4, learning_rate=2e-3)
    refused = rlhf_run(spec, workdir)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "sft: the stage's inputs changed since its final output" in refused.stderr
    assert "hyperparameters.maxSteps 3 -> 4" in refused.stderr
    assert "hyperparameters.learningRate 0.001 -> 0.002" in refused.stderr
    assert "--restart sft" in refused.stderr
    assert weights_digest(stage_dir / "final") == before, "the old output is untouched"
    status = json.loads((workdir / "rerun" / "status.json").read_text())
    assert status["phase"] == "Failed"
    assert "hyperparameters.maxSteps 3 -> 4" in status["stages"][0]["message"]

    restarted = rlhf_run(spec, workdir, "--restart", "sft")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    [old] = list((workdir / "rerun").glob("sft.old-*"))
    assert weights_digest(old / "final") == before, "the old outputs were moved, not deleted"
    assert weights_digest(stage_dir / "final") != before
    progress = json.loads((stage_dir / "progress.json").read_text())
    assert progress["step"] == progress["totalSteps"] == 4
    record = json.loads((stage_dir / "final" / "inputs.json").read_text())
    assert record["fields"]["hyperparameters.learningRate"] == 2e-3
