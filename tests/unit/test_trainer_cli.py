"""`python -m rlhf_trainer`: user errors are one `error:` line and exit status 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rlhf_trainer.__main__ import TRAINERS, main
from rlhf_trainer.config import (
    WORKSPACE_ENV,
    DatasetSpec,
    Hyperparameters,
    ModelSource,
    StageConfig,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return tmp_path


def write(workspace: Path, model: Path, dataset: Path, **hp: int) -> Path:
    config = StageConfig(
        run="r",
        stage="s",
        type="sft",
        model=ModelSource(path=str(model)),
        dataset=DatasetSpec(path=str(dataset)),
        output_dir="out",
        hyperparameters=Hyperparameters.model_validate(hp),
    )
    path = workspace / "sft.yaml"
    path.write_text(config.to_yaml())
    return path


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_stage_without_trainer(
    capsys: pytest.CaptureFixture[str], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(TRAINERS, "reward")
    assert main(["reward", "--config", str(workspace / "any.yaml")]) == 2
    assert error_line(capsys) == "error: stage type reward has no trainer yet"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("run: [unclosed", "not valid YAML"),
        ("- a list", "expected a mapping"),
        ("run: r\nstage: s\ntype: sft\nmodel: {path: m}\noutputDir: o\nbogus: 1\n", "bogus"),
    ],
)
def test_bad_config_is_one_line(
    text: str, needle: str, capsys: pytest.CaptureFixture[str], workspace: Path
) -> None:
    path = workspace / "bad.yaml"
    path.write_text(text)
    assert main(["sft", "--config", str(path)]) == 2
    line = error_line(capsys)
    assert str(path) in line and needle in line and "; fix" in line
    assert not (workspace / "out").exists()


def test_missing_config_file(capsys: pytest.CaptureFixture[str], workspace: Path) -> None:
    assert main(["sft", "--config", str(workspace / "nope.yaml")]) == 2
    assert "cannot read the config file" in error_line(capsys)


def test_config_for_another_stage_type(
    capsys: pytest.CaptureFixture[str], workspace: Path, fixtures_dir: Path
) -> None:
    path = write(workspace, workspace, fixtures_dir / "sft.jsonl")
    path.write_text(path.read_text().replace("type: sft", "type: dpo"))
    assert main(["sft", "--config", str(path)]) == 2
    assert "is for a dpo stage, not sft" in error_line(capsys)


def test_indivisible_batch_for_the_world_size(
    capsys: pytest.CaptureFixture[str],
    workspace: Path,
    tiny_model_dir: Path,
    fixtures_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write(workspace, tiny_model_dir, fixtures_dir / "sft.jsonl", batch_size=6,
                 gradient_accumulation=2)  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sft", "--config", str(path)]) == 2
    assert "batchSize: 6 does not divide into 2 ranks x 2" in error_line(capsys)
    assert not (workspace / "out").exists()


def test_missing_model_path(
    capsys: pytest.CaptureFixture[str], workspace: Path, fixtures_dir: Path
) -> None:
    path = write(workspace, Path("models/none"), fixtures_dir / "sft.jsonl")
    assert main(["sft", "--config", str(path)]) == 2
    line = error_line(capsys)
    assert f"model.path: {workspace / 'models/none'} does not exist" in line
    assert "rlhf tiny-model DIR" in line


def test_other_ranks_leave_the_report_to_rank_zero(
    capsys: pytest.CaptureFixture[str], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 1 waits the grace period first (torchrun stops it when rank 0 has reported and
    # exited); a rank 1 still running after it is alone with the error and reports it.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("RLHF_ERROR_GRACE_SECONDS", "0.3")
    started = time.monotonic()
    assert main(["ppo", "--config", "x.yaml"]) == 2
    assert time.monotonic() - started >= 0.3
    assert "x.yaml" in error_line(capsys)


def test_validate_only_writes_nothing(
    capsys: pytest.CaptureFixture[str], workspace: Path, tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    path = write(workspace, tiny_model_dir, fixtures_dir / "sft.jsonl", batch_size=16)
    assert main(["sft", "--config", str(path), "--validate-only"]) == 0
    assert sorted(p.name for p in workspace.iterdir()) == ["sft.yaml"]
    args = ["sft", "--config", str(path), "--validate-only", "--world-size", "3"]
    assert main(args) == 2
    assert "batchSize: 16 does not divide into 3 ranks" in error_line(capsys)


def test_the_error_line_goes_to_the_termination_log_in_a_container(
    capsys: pytest.CaptureFixture[str], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod the kubelet creates the file; the operator reads the line from the container
    status. Outside one (no file) nothing is written."""
    log = workspace / "termination-log"
    monkeypatch.setenv("RLHF_TERMINATION_LOG", str(log))
    assert main(["sft", "--config", str(workspace / "nope.yaml")]) == 2
    assert not log.exists()
    log.write_text("")
    assert main(["sft", "--config", str(workspace / "nope.yaml")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert log.read_text() == line + "\n" and line.startswith("error: ")
