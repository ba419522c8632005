"""plan_check.with_stand_ins: only folders that do not exist yet are replaced by the base model."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_trainer.config import ModelSource, StageConfig
from rlhf_trainer.plan_check import with_stand_ins

pytestmark = pytest.mark.unit


def config(**fields: object) -> StageConfig:
    return StageConfig.model_validate(
        {
            "run": "r",
            "stage": "s",
            "type": "evaluate",
            "output_dir": "r/s",
            "model": {"path": "r/sft/final"},
            **fields,
        }
    )


def test_missing_folders_get_the_base_and_existing_ones_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLHF_WORKSPACE", str(tmp_path))
    (tmp_path / "base").mkdir()
    (tmp_path / "r" / "ppo" / "final").mkdir(parents=True)
    planned = with_stand_ins(
        config(
            reward_model_path="r/rm/final",
            policies={"ppo": "r/ppo/final", "dpo": "r/dpo/final"},
        ),
        "base",
    )
    assert planned is not None
    assert planned.model == ModelSource(path="base")
    assert planned.reward_model_path == "base"
    assert planned.policies == {"ppo": "r/ppo/final", "dpo": "base"}


def test_a_hub_base_stands_in_for_the_start_but_not_for_a_reward_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLHF_WORKSPACE", str(tmp_path))
    planned = with_stand_ins(config(), "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert planned is not None
    assert planned.model == ModelSource(name="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert with_stand_ins(config(reward_model_path="r/rm/final"), "org/model") is None
