"""The record of a stage's inputs (rlhf_trainer/runtime/stage_inputs.py) and `rlhf run --restart`
(rlhf_operator/restart.py)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rlhf_operator import api, restart
from rlhf_trainer.config import StageConfig
from rlhf_trainer.runtime import stage_inputs
from rlhf_trainer.runtime.stage_inputs import (
    InputsChanged,
    changes,
    check_stage_inputs,
    guard_outputs,
    stage_record,
)

pytestmark = pytest.mark.unit


def config(tmp: Path, **overrides: Any) -> StageConfig:
    """A dpo stage from an upstream `final/`, its dataset under `tmp`; `overrides` merge in."""
    data: dict[str, Any] = {
        "run": "r",
        "stage": "dpo",
        "type": "dpo",
        "model": {"path": str(tmp / "r" / "sft" / "final")},
        "dataset": {"path": str(tmp / "pairs.jsonl"), "format": "preference"},
        "outputDir": str(tmp / "r" / "dpo"),
        "hyperparameters": {"maxSteps": 30, "learningRate": 1e-5, "saveEvery": 10},
        "dpo": {"beta": 0.1},
    }
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return StageConfig.model_validate(data)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    final = tmp_path / "r" / "sft" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "r" / "sft" / "inputs.json").write_text('{"version": 1, "fields": {"a": 1}}')
    return tmp_path


def finish(cfg: StageConfig, record: dict[str, Any] | None) -> Path:
    """Make `cfg`'s stage look finished, with `record` (None: an output from before records)."""
    out = Path(cfg.output_dir)
    (out / "final").mkdir(parents=True)
    if record is not None:
        stage_inputs.write_record(out, record)
    return out


def test_result_fields_count_and_bookkeeping_does_not(tmp: Path) -> None:
    base = stage_record(config(tmp))
    same = stage_record(
        config(
            tmp,
            **{
                "hyperparameters.logEvery": 7,
                "hyperparameters.saveEvery": 3,
                "hyperparameters.keepCheckpoints": 5,
                "outputDir": str(tmp / "elsewhere"),
                "run": "renamed",
            },
        )
    )
    assert changes(base, same) == []
    edited = stage_record(
        config(
            tmp,
            **{"hyperparameters.maxSteps": 40, "hyperparameters.learningRate": 2e-5},
            **{"dpo.beta": 0.2, "hyperparameters.warmupSteps": 3},
        )
    )
    assert changes(base, edited) == [
        "dpo.beta 0.1 -> 0.2",
        "hyperparameters.learningRate 1e-05 -> 2e-05",
        "hyperparameters.maxSteps 30 -> 40",
        "hyperparameters.warmupSteps 0 -> 3",
    ]


def test_rollout_addresses_and_timeouts_do_not_count(tmp: Path) -> None:
    rollout = {"urls": ["http://127.0.0.1:8001"], "servedModel": "policy", "timeoutSeconds": 30}
    base = stage_record(config(tmp, rollout=rollout))
    moved = {**rollout, "urls": ["http://127.0.0.1:9999"], "timeoutSeconds": 99}
    assert changes(base, stage_record(config(tmp, rollout=moved))) == []
    renamed = {**rollout, "servedModel": "other"}
    assert changes(base, stage_record(config(tmp, rollout=renamed))) == [
        'rollout.servedModel "policy" -> "other"'
    ]


def test_an_edited_dataset_file_is_a_change(tmp: Path) -> None:
    base = stage_record(config(tmp))
    (tmp / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "B", "rejected": "c"}\n')
    assert changes(base, stage_record(config(tmp))) == [
        f"dataset.path: the contents of {tmp / 'pairs.jsonl'} changed"
    ]


def test_a_retrained_from_stage_is_a_change(tmp: Path) -> None:
    base = stage_record(config(tmp))
    assert base["files"]["model.path"].startswith("record:")
    (tmp / "r" / "sft" / "inputs.json").write_text('{"version": 1, "fields": {"a": 2}}')
    assert changes(base, stage_record(config(tmp))) == [
        f"model.path: the contents of {tmp / 'r' / 'sft' / 'final'} changed"
    ]


def test_a_base_model_folder_is_known_by_its_files(tmp: Path) -> None:
    model = tmp / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    base = stage_record(config(tmp, model={"path": str(model)}))
    assert base["files"]["model.path"].startswith("stamps:")
    (model / "model.safetensors").write_bytes(b"new")
    assert len(changes(base, stage_record(config(tmp, model={"path": str(model)})))) == 1


def test_a_finished_stage_refuses_changed_inputs(tmp: Path) -> None:
    cfg = config(tmp)
    out = finish(cfg, stage_record(cfg))
    assert check_stage_inputs(cfg, stage_record(cfg)) is False  # unchanged: nothing to write
    edited = config(tmp, **{"hyperparameters.maxSteps": 40})
    with pytest.raises(InputsChanged) as err:
        check_stage_inputs(edited, stage_record(edited))
    message = str(err.value)
    assert message.startswith(f"dpo: the stage's inputs changed since its final output in {out}")
    assert "hyperparameters.maxSteps 30 -> 40" in message
    assert "--restart dpo" in message


def test_a_checkpointed_stage_refuses_changed_inputs(tmp: Path) -> None:
    cfg = config(tmp)
    out = Path(cfg.output_dir)
    for step in (10, 20):
        (out / "checkpoints" / f"step-{step}").mkdir(parents=True)
    stage_inputs.write_record(out, stage_record(cfg))
    edited = config(tmp, **{"dpo.beta": 0.3})
    expected = r"since its checkpoint step-20 .*dpo\.beta 0\.1 -> 0\.3"
    with pytest.raises(InputsChanged, match=expected):
        check_stage_inputs(edited, stage_record(edited))


def test_outputs_without_a_record_are_used_with_a_warning(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp)
    out = finish(cfg, None)
    with caplog.at_level(logging.WARNING, logger="rlhf_trainer.runtime.stage_inputs"):
        guard_outputs(cfg, rank=0)
    assert "no record of the inputs it was trained on" in caplog.text
    assert json.loads((out / "inputs.json").read_text()) == stage_record(cfg)


def test_only_rank_zero_writes_the_record(tmp: Path) -> None:
    cfg = config(tmp)
    guard_outputs(cfg, rank=1)
    assert not (Path(cfg.output_dir) / "inputs.json").exists()
    guard_outputs(cfg, rank=0)
    assert json.loads((Path(cfg.output_dir) / "inputs.json").read_text()) == stage_record(cfg)


def test_the_operator_recognises_the_trainers_refusal() -> None:
    assert restart.REFUSAL_MARK == stage_inputs.REFUSAL_MARK
    refused = api.RunStatus(
        phase="Failed",
        stages=[
            api.StageStatus(
                name="sft",
                type="sft",
                phase="Failed",
                message=f"sft: {stage_inputs.REFUSAL_MARK} its final output in /w: x 1 -> 2",
            )
        ],
    )
    other = api.RunStatus(
        phase="Failed", stages=[api.StageStatus(name="sft", type="sft", phase="Failed")]
    )
    assert restart.exit_code(refused) == 2
    assert restart.exit_code(other) == 1
    assert restart.exit_code(api.RunStatus(phase="Succeeded")) == 0


def run_of(*names: str) -> api.RLHFRun:
    stages = [{"name": n, "type": "sft", "dataset": {"path": "d.jsonl"}} for n in names]
    return api.RLHFRun.model_validate(
        {
            "apiVersion": "rlhf.dev/v1alpha1",
            "kind": "RLHFRun",
            "metadata": {"name": "r"},
            "spec": {"model": {"path": "m"}, "stages": stages},
        }
    )


def test_restart_moves_the_stage_and_later_ones_aside(tmp_path: Path) -> None:
    run = run_of("sft", "rm", "ppo")
    assert restart.stages_from(run, "rm") == ["rm", "ppo"]
    with pytest.raises(ValueError, match="no stage dpo; choose one of sft, rm, ppo"):
        restart.stages_from(run, "dpo")
    for name in ("sft", "rm"):
        (tmp_path / name / "final").mkdir(parents=True)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    moved = restart.move_aside(tmp_path, ["rm", "ppo"], now)
    assert [(m.stage, m.target.name) for m in moved] == [("rm", "rm.old-20260102T030405Z")]
    assert (tmp_path / "rm.old-20260102T030405Z" / "final").is_dir()
    assert (tmp_path / "sft" / "final").is_dir() and not (tmp_path / "rm").exists()
    (tmp_path / "rm" / "final").mkdir(parents=True)
    [again] = restart.move_aside(tmp_path, ["rm"], now)
    assert again.target.name == "rm.old-20260102T030405Z-2"
