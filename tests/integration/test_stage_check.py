"""`rlhf run` checks every later stage's files before its first stage starts
(operator/rlhf_operator/local_check.py, trainer/rlhf_trainer/plan_check.py): a bad row or a batch
larger than the data of the last stage is reported with the stage's path in the spec, before any
process trains, and a stage that starts from an earlier stage's not-yet-written `final/` is
checked with the base model's tokenizer and chat template in its place."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_operator import api
from rlhf_operator.local_check import check_stage_files

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RLHF = [sys.executable, "-m", "rlhf_operator.cli"]


def write_run(workdir: Path, stages: list[dict[str, Any]], model: str) -> Path:
    spec = {
        "apiVersion": "rlhf.dev/v1alpha1",
        "kind": "RLHFRun",
        "metadata": {"name": "check"},
        "spec": {"model": {"path": model}, "trainer": {"nprocPerNode": 1}, "stages": stages},
    }
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def hp(**extra: Any) -> dict[str, Any]:
    return {"maxSteps": 2, "batchSize": 4, "maxLength": 64, **extra}


def test_later_stages_files_fail_before_the_first_stage_starts(
    tmp_path: Path, tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    (tmp_path / "data").mkdir()
    for name in ("sft.jsonl", "preference.jsonl"):
        shutil.copy(fixtures_dir / name, tmp_path / "data" / name)
    rows = (fixtures_dir / "preference.jsonl").read_text().splitlines()
    bad = [*rows[:20], json.dumps({"prompt": "2+2=", "chosen": " 4."}), *rows[20:]]
    (tmp_path / "data" / "pairs.jsonl").write_text("\n".join(bad) + "\n")
    run = write_run(
        tmp_path,
        [
            {
                "name": "sft",
                "type": "sft",
                "dataset": {"path": "data/sft.jsonl"},
                "hyperparameters": hp(),
            },
            {
                "name": "rm",
                "type": "reward",
                "from": "sft",
                "dataset": {"path": "data/preference.jsonl", "format": "preference"},
                "hyperparameters": hp(batchSize=100000),
            },
            {
                "name": "dpo",
                "type": "dpo",
                "from": "sft",
                "dataset": {"path": "data/pairs.jsonl", "format": "preference"},
                "hyperparameters": hp(),
            },
        ],
        str(tiny_model_dir),
    )
    result = subprocess.run(
        [*RLHF, "run", str(run), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert any(
        "spec.stages[1] (rm): hyperparameters.batchSize: 100000 is more than" in line
        for line in lines
    ), result.stderr
    assert any("spec.stages[2] (dpo): " in line and "line 21" in line for line in lines), (
        result.stderr
    )
    assert not (tmp_path / "check").exists()  # nothing started, nothing written


def brief_stages(max_length: int) -> list[dict[str, Any]]:
    return [
        {
            "name": "sft",
            "type": "sft",
            "dataset": {"path": "data/brief_sft.jsonl", "format": "chat"},
            "hyperparameters": hp(maxLength=256),
        },
        {
            "name": "grpo",
            "type": "grpo",
            "from": "sft",
            "dataset": {"path": "data/brief_prompts.jsonl", "format": "chat"},
            "reward": {"function": "brief"},
            "rollout": {"engine": "trainer"},
            "grpo": {"rolloutBatchSize": 4, "numGenerations": 2, "maxNewTokens": 32},
            "hyperparameters": hp(maxLength=max_length),
        },
    ]


def test_a_stage_from_an_unwritten_output_is_checked_with_the_base_template(
    tmp_path: Path, smollm2: Path
) -> None:
    """grpo starts from sft's final/, which does not exist yet: its chat prompts are rendered
    with SmolLM2's template (the one sft copies into its output) and measured against the room
    maxLength leaves after maxNewTokens."""
    (tmp_path / "data").mkdir()
    for path in (ROOT / "tests" / "fixtures" / "brief").glob("*.jsonl"):
        shutil.copy(path, tmp_path / "data" / path.name)
    too_short = api.RLHFRun.model_validate(
        yaml.safe_load(write_run(tmp_path, brief_stages(40), str(smollm2)).read_text())
    )
    [problem] = check_stage_files(too_short, tmp_path)
    assert problem.startswith("spec.stages[1] (grpo): data/brief_prompts.jsonl line 1: "), problem
    assert "the rendered prompt is" in problem and "more than the 8 " in problem, problem
    fits = api.RLHFRun.model_validate(
        yaml.safe_load(write_run(tmp_path, brief_stages(160), str(smollm2)).read_text())
    )
    assert check_stage_files(fits, tmp_path) == []
