"""Fixtures shared by the integration modules that train on the weak SFT policy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_online_vllm import SFT_STEPS, confused_sft_rows, env_for, torchrun, write


@pytest.fixture(scope="session")
def policy(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, fixtures_dir: Path
) -> tuple[Path, Path]:
    """(workspace, the weak SFT policy in it): test_online_vllm.py's policy (half the animals
    mislabelled 60% of the time), trained once for the engine, GRPO-option and PPO runs. Each
    run writes its own `it/<stage>` folder in the workspace, so they never share outputs."""
    workspace = tmp_path_factory.mktemp("engine")
    data = workspace / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in confused_sft_rows()))
    (data / "prompts.jsonl").write_text((fixtures_dir / "prompts.jsonl").read_text())
    sft = write(workspace, {
        "run": "it", "stage": "sft", "type": "sft", "model": {"path": str(tiny_model_dir)},
        "dataset": {"path": "data/sft.jsonl"}, "outputDir": "it/sft",
        "hyperparameters": {"maxSteps": SFT_STEPS, "learningRate": 3e-3, "batchSize": 16,
                            "maxLength": 64, "warmupSteps": 5, "saveEvery": 1000, "seed": 0},
    })  # fmt: skip
    proc = subprocess.run(torchrun("sft", sft), env=env_for(workspace), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workspace, workspace / "it" / "sft" / "final"
