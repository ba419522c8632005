"""The feedback stage's checks and bookkeeping, without a server."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rlhf_trainer.config import StageConfig
from rlhf_trainer.errors import UserError
from rlhf_trainer.feedback.stage import Tally, check_feedback

pytestmark = pytest.mark.unit


def config(fixtures: Path, tmp_path: Path, **updates: Any) -> StageConfig:
    (tmp_path / "judge").mkdir(exist_ok=True)
    (tmp_path / "judge" / "tokenizer_config.json").write_text("{}")
    base: dict[str, Any] = {
        "run": "r", "stage": "fb", "type": "feedback", "model": {"path": "m"},
        "dataset": {"path": str(fixtures / "ranked.jsonl"), "format": "ranked"},
        "outputDir": str(tmp_path / "out"),
        "feedback": {"responsesPerPrompt": 3, "maxPrompts": 5},
        "judge": {"urls": ["http://j"], "servedModel": "judge",
                  "model": {"path": str(tmp_path / "judge")}},
    }  # fmt: skip
    return StageConfig.model_validate({**base, **updates})


def test_ranked_rows_give_their_first_k_responses(fixtures_dir: Path, tmp_path: Path) -> None:
    inputs = check_feedback(config(fixtures_dir, tmp_path))
    assert len(inputs.items) == 5
    assert all(len(item.responses) == 3 for item in inputs.items)
    assert inputs.chat.template is None  # the judge model has no chat template
    assert "5 prompts" in inputs.describe()


def test_pair_rows_give_both_sides(fixtures_dir: Path, tmp_path: Path) -> None:
    dataset = {"path": str(fixtures_dir / "preference.jsonl"), "format": "preference"}
    inputs = check_feedback(config(fixtures_dir, tmp_path, dataset=dataset))
    assert all(len(item.responses) == 2 for item in inputs.items)


def test_prompts_need_a_policy_to_sample_from(fixtures_dir: Path, tmp_path: Path) -> None:
    dataset = {"path": str(fixtures_dir / "prompts.jsonl"), "format": "prompts"}
    with pytest.raises(UserError, match="set `rollout`"):
        check_feedback(config(fixtures_dir, tmp_path, dataset=dataset))
    rollout = {"urls": ["http://p"], "servedModel": "policy"}
    inputs = check_feedback(config(fixtures_dir, tmp_path, dataset=dataset, rollout=rollout))
    assert inputs.items and all(item.responses == () for item in inputs.items)
    assert "sampled from the policy" in inputs.describe()


def test_a_feedback_stage_needs_the_judge(fixtures_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="judge"):
        check_feedback(config(fixtures_dir, tmp_path, judge=None))


def test_agreement_rate_only_with_both_orders() -> None:
    tally = Tally(Counter(kept=3, disagreed=1, timeout=2), swap=True, margin_sum=0.9)
    record = tally.record()
    assert record["agreement_rate"] == 0.75 and record["judged_pairs"] == 6
    assert record["timeout_pairs"] == 2 and record["margin_mean"] == pytest.approx(0.3)
    assert "agreement_rate" not in Tally(Counter(kept=3), swap=False).record()
    assert record["unknown_strength_pairs"] == 0.0
    assert Tally(Counter(kept=3), unknown_strength=2).record()["unknown_strength_pairs"] == 2.0


def test_chat_rows_are_refused_by_name(fixtures_dir: Path, tmp_path: Path) -> None:
    dataset = {"path": str(fixtures_dir / "brief" / "brief_pairs.jsonl"), "format": "chat"}
    with pytest.raises(UserError, match="feedback stage does not read chat rows yet"):
        check_feedback(config(fixtures_dir, tmp_path, dataset=dataset))
