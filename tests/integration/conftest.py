"""Fixtures shared by the integration modules that train on the weak SFT policy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_online_vllm import env_for, torchrun, weak_sft_workspace


@pytest.fixture(scope="session")
def policy(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, fixtures_dir: Path
) -> tuple[Path, Path]:
    """(workspace, the weak SFT policy in it): test_online_vllm.py's policy (half the animals
    mislabelled 60% of the time), trained once for the engine, GRPO-option and PPO runs. Each
    run writes its own `it/<stage>` folder in the workspace, so they never share outputs."""
    workspace = tmp_path_factory.mktemp("engine")
    sft = weak_sft_workspace(workspace, tiny_model_dir, fixtures_dir)
    proc = subprocess.run(torchrun("sft", sft), env=env_for(workspace), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workspace, workspace / "it" / "sft" / "final"
