"""Secrets reach trainers only as references; a planted token never lands in what we write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_quickstart import ROOT, rlhf_run, workspace

pytestmark = pytest.mark.e2e

TOKEN = "hf_PLANTED0123456789secretTOKEN"


def test_planted_token_is_never_rendered_logged_or_stored(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["model"]["tokenSecretRef"] = {"name": "hf-token", "key": "token"}
    doc["spec"]["stages"][0]["hyperparameters"]["maxSteps"] = 4
    spec = tmp_path / "with-secret.yaml"
    spec.write_text(yaml.safe_dump(doc))

    rendered = subprocess.run(
        [sys.executable, "-m", "rlhf_operator.cli", "render", str(spec)],
        capture_output=True, text=True, check=True, env={**os.environ, "HF_TOKEN": TOKEN},
    ).stdout
    assert TOKEN not in rendered
    assert "secretKeyRef" in rendered and "hf-token" in rendered

    workdir = workspace(tmp_path / "w", tiny_model_dir)
    os.environ["HF_TOKEN"] = TOKEN
    try:
        result = rlhf_run(spec, workdir)
    finally:
        del os.environ["HF_TOKEN"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert TOKEN not in result.stdout + result.stderr
    written = [p for p in (workdir / "quickstart").rglob("*") if p.is_file()]
    assert any(p.name == "status.json" for p in written)
    assert any(p.suffix == ".log" for p in written)
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), f"token leaked into {path}"
