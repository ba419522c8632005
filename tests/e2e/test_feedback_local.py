"""End to end: AI feedback into a reward model through `rlhf run`, on one machine.

The local executor starts the judge (a vLLM server on the tiny model) from the Deployment the
planner asks for, rewrites its Service URL in the stage config, runs the feedback stage
against it and stops it when the stage is done; the reward stage then trains on the judge's
preferences with their margins. The judge is a random model, so this checks the wiring, not
the judgement (one order only: its verdicts are pure position bias).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RUN = {
    "apiVersion": "rlhf.dev/v1alpha1",
    "kind": "RLHFRun",
    "metadata": {"name": "rlaif"},
    "spec": {
        "model": {"path": "models/tiny-llama"},
        "judge": {"engine": "vllm", "model": {"path": "models/tiny-llama"}, "maxNewTokens": 12},
        "stages": [
            {
                "name": "feedback",
                "type": "feedback",
                "dataset": {"path": "data/ranked.jsonl", "format": "ranked"},
                "feedback": {"responsesPerPrompt": 2, "maxPrompts": 12, "positionSwap": False},
            },
            {
                "name": "rm",
                "type": "reward",
                "dataset": {"path": "rlaif/feedback/final/preference.jsonl",
                            "format": "preference"},
                "rewardModel": {"useMargin": True},
                "hyperparameters": {"maxSteps": 2, "batchSize": 4, "maxLength": 64},
            },
        ],
    },
}  # fmt: skip


def test_feedback_then_reward_locally(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "ranked.jsonl", tmp_path / "data")
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny-llama")
    spec = tmp_path / "rlaif.yaml"
    spec.write_text(yaml.safe_dump(RUN))
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_operator.cli", "run", str(spec), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    run_dir = tmp_path / "rlaif"
    status = json.loads((run_dir / "status.json").read_text())
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s["phase"] for s in status["stages"]] == ["Succeeded", "Succeeded"]
    final = run_dir / "feedback" / "final"
    rows = [json.loads(line) for line in (final / "preference.jsonl").read_text().splitlines()]
    assert len(rows) == 12  # one pair per prompt, one order: every parsed verdict is kept
    assert all(0.0 <= r["margin"] <= 1.0 and r["judge"]["reference"] is not None for r in rows)
    summary = json.loads((final / "feedback.json").read_text())
    assert summary["kept_pairs"] == 12 and summary["protocol"] == "self-reference"
    # The judge ran as its own server process, next to the trainers.
    assert (run_dir / "logs" / "rlaif-feedback-judge-0.log").is_file()
    assert (run_dir / "rm" / "final" / "config.json").is_file()
    rm = [json.loads(line) for line in (run_dir / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rm)
