"""End to end: `rlhf run examples/quickstart.yaml` through the planner, local executor,
torchrun and the SFT trainer, exactly as `make run` does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pytest
import yaml

from rlhf_operator.planner import SUPPORTED_STAGE_TYPES
from rlhf_trainer.config import StageType

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RLHF = [sys.executable, "-m", "rlhf_operator.cli"]


def workspace(tmp: Path, model_from: Path | None) -> Path:
    (tmp / "data").mkdir(parents=True)
    for path in (ROOT / "tests" / "fixtures").glob("*.jsonl"):
        shutil.copy(path, tmp / "data" / path.name)
    if model_from is not None:
        shutil.copytree(model_from, tmp / "models" / "tiny-llama")
    return tmp


def rlhf_run(spec: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RLHF, "run", str(spec), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "160"},
    )


def test_quickstart_succeeds_in_under_five_minutes(tiny_model_dir: Path, tmp_path: Path) -> None:
    workdir = workspace(tmp_path, tiny_model_dir)
    started = time.monotonic()
    result = rlhf_run(ROOT / "examples" / "quickstart.yaml", workdir)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 300, f"quickstart took {elapsed:.0f}s"
    status = json.loads((workdir / "quickstart" / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    [stage] = status["stages"]
    assert stage["name"] == "sft" and stage["phase"] == "Succeeded"
    assert stage["output"] == str(workdir.resolve() / "quickstart" / "sft" / "final")
    assert (Path(stage["output"]) / "config.json").is_file()
    assert (Path(stage["output"]) / "tokenizer.json").is_file()
    assert stage["metrics"]["step"] == stage["metrics"]["totalSteps"] == 60
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "Ready": "True", "Progressing": "False", "Degraded": "False", "Succeeded": "True"
    }
    stage_dir = workdir / "quickstart" / "sft"
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 61))
    assert "StageSucceeded" in result.stderr and "RunSucceeded" in result.stderr


def test_missing_model_path_fails_before_anything_is_written(tmp_path: Path) -> None:
    workdir = workspace(tmp_path, model_from=None)
    result = rlhf_run(ROOT / "examples" / "quickstart.yaml", workdir)
    assert result.returncode == 1
    assert "spec.model.path" in result.stderr and "rlhf tiny-model" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "quickstart").exists(), "nothing is half-written"


def test_bad_dataset_row_fails_the_stage_with_a_clear_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    workdir = workspace(tmp_path, tiny_model_dir)
    rows = (workdir / "data" / "sft.jsonl").read_text().splitlines()
    broken = json.loads(rows[6])
    del broken["response"]
    rows[6] = json.dumps(broken)
    (workdir / "data" / "sft.jsonl").write_text("\n".join(rows) + "\n")
    result = rlhf_run(ROOT / "examples" / "quickstart.yaml", workdir)
    assert result.returncode == 1
    status = json.loads((workdir / "quickstart" / "status.json").read_text())
    assert status["phase"] == "Failed"
    message = status["stages"][0]["message"]
    assert "line 7" in message and "response" in message, message
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and "line 7" in degraded["message"]
    stage_dir = workdir / "quickstart" / "sft"
    assert not (stage_dir / "final").exists() and not (stage_dir / "checkpoints").exists()


def test_unsupported_stage_is_refused_locally(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Every stage type runs now; what is still refused up front is, e.g., rollouts on lmdeploy.
    assert set(get_args(StageType)) == SUPPORTED_STAGE_TYPES
    workdir = workspace(tmp_path, tiny_model_dir)
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    stage = doc["spec"]["stages"][0]
    stage.update(
        type="grpo",
        reward={"function": "animal_sounds"},
        rollout={"engine": "lmdeploy"},
        dataset={"path": "data/prompts.jsonl", "format": "prompts"},
    )
    spec = tmp_path / "unsupported.yaml"
    spec.write_text(yaml.safe_dump(doc))
    result = rlhf_run(spec, workdir)
    # Refused when the file is read, as `rlhf validate` refuses it: nothing starts or is written.
    assert result.returncode == 1
    assert "spec.stages[0].rollout.engine: 'lmdeploy' cannot serve rollouts yet" in result.stderr
    assert not (workdir / "quickstart").exists()
