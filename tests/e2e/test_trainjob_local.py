"""End to end: the TrainJob backend through `rlhf run`. The local executor launches a TrainJob's
pods from `spec.trainer` and the operator's `runtimePatches` entry, with the PET_* env Kubeflow
Trainer injects, so the same torchrun command runs as on a cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_trainjob_backend_runs_locally(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "sft.jsonl", tmp_path / "data" / "sft.jsonl")
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny-llama")
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["trainer"] = {"backend": "trainjob", "nprocPerNode": 2}
    doc["spec"]["stages"][0]["hyperparameters"].update(maxSteps=4, saveEvery=2)
    spec = tmp_path / "trainjob.yaml"
    spec.write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_operator.cli", "run", str(spec), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads((tmp_path / "quickstart" / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    [stage] = status["stages"]
    assert stage["jobName"] == "quickstart-sft" and stage["metrics"]["step"] == 4
    assert (Path(stage["output"]) / "config.json").is_file()
    assert (tmp_path / "quickstart" / "logs" / "quickstart-sft-0.log").is_file(), "one node"
    assert not (tmp_path / "quickstart" / "logs" / "quickstart-sft-1.log").exists()
