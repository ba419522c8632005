"""Preference dataset formats: SHP, TL;DR, field mapping, skipInvalid, ranked pairs, preflight."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rlhf_trainer.config import (
    DatasetSpec,
    DPOOptions,
    LoRAOptions,
    ModelSource,
    RRHFOptions,
    StageConfig,
)
from rlhf_trainer.data.formats import expand_pairs
from rlhf_trainer.data.readers import (
    PreferenceRow,
    RankedRow,
    load_preference_rows,
    load_prompt_rows,
    load_ranked_rows,
    load_sft_rows,
)
from rlhf_trainer.errors import DataError, UserError
from rlhf_trainer.preflight import check_dpo, check_reward, check_rrhf

pytestmark = pytest.mark.unit

SHP = {"history": "Why is the sky blue?", "human_ref_A": "Rayleigh.", "human_ref_B": "Magic.",
       "labels": 1, "score_A": 10, "score_B": 2}  # fmt: skip
TLDR = {
    "info": {"id": "t3", "post": "I lost my keys.", "title": "Keys", "subreddit": "help"},
    "summaries": [{"text": " Lost keys. ", "policy": "a"}, {"text": "Found a cat.", "policy": "b"}],
    "choice": 0,
}


def write(tmp_path: Path, rows: list[Any], name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def spec(path: Path, fmt: str, **extra: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"path": str(path), "format": fmt, **extra})


def test_shp_rows_follow_the_label(tmp_path: Path) -> None:
    flipped = {**SHP, "labels": 0}
    pairs = load_preference_rows(spec(write(tmp_path, [SHP, flipped]), "shp"))
    assert pairs == [
        PreferenceRow("Why is the sky blue?", " Rayleigh.", " Magic."),
        PreferenceRow("Why is the sky blue?", " Magic.", " Rayleigh."),
    ]
    [sft] = load_sft_rows(spec(write(tmp_path, [SHP]), "shp"))
    assert sft.response == " Rayleigh."


def test_tldr_rows_build_the_reddit_prompt(tmp_path: Path) -> None:
    [pair] = load_preference_rows(spec(write(tmp_path, [TLDR, ]), "tldr"))  # fmt: skip
    assert pair.prompt == "SUBREDDIT: r/help\n\nTITLE: Keys\n\nPOST: I lost my keys.\n\nTL;DR:"
    assert (pair.chosen, pair.rejected) == (" Lost keys.", " Found a cat.")
    [prompt] = load_prompt_rows(spec(write(tmp_path, [{**TLDR, "choice": 1}]), "tldr"))
    assert prompt.prompt.endswith("TL;DR:")


BAD = [
    ("shp", {**SHP, "labels": 2}, '"labels"', "0 or 1"),
    ("shp", {k: v for k, v in SHP.items() if k != "human_ref_B"}, '"human_ref_B"', "missing"),
    ("tldr", {**TLDR, "choice": True}, '"choice"', "0 or 1"),
    ("tldr", {**TLDR, "summaries": [{"text": "x"}]}, '"summaries"', "two"),
    ("tldr", {**TLDR, "info": {"title": "no post"}}, '"info"', '"post"'),
]


@pytest.mark.parametrize(("fmt", "row", "field", "what"), BAD)
def test_bad_rows_name_line_and_field(
    tmp_path: Path, fmt: str, row: dict[str, Any], field: str, what: str
) -> None:
    good = SHP if fmt == "shp" else TLDR
    path = write(tmp_path, [good, row])
    with pytest.raises(DataError) as err:
        load_preference_rows(spec(path, fmt))
    message = str(err.value)
    assert message.startswith(f"{path} line 2: ") and field in message and what in message
    assert "\n" not in message


def test_fields_map_columns_and_name_them_in_errors(tmp_path: Path) -> None:
    rows = [{"question": "q", "good": " a", "bad": " b", "strength": 2}]
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "strength"}
    path = write(tmp_path, [*rows, {"question": "q", "bad": " b"}])
    with pytest.raises(DataError) as err:
        load_preference_rows(spec(path, "preference", fields=fields))
    assert 'line 2: missing field "good" (dataset.fields.chosen)' in str(err.value)
    pairs = load_preference_rows(spec(write(tmp_path, rows), "preference", fields=fields))
    assert pairs == [PreferenceRow("q", " a", " b", 2.0)]
    # Refused with the spec itself (DatasetSpec), before any row is read.
    with pytest.raises(ValidationError, match=r"fields\n.*answer is not a field of format"):
        spec(path, "preference", fields={"answer": "x"})


def test_skip_invalid_counts_and_keeps_the_good_rows(tmp_path: Path) -> None:
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    rows = [good, {"prompt": "p"}, "not json", [1, 2], {**good, "margin": "big"}, good]
    path = write(tmp_path, rows)
    with pytest.raises(DataError, match="line 2"):
        load_preference_rows(spec(path, "preference"))
    kept = load_preference_rows(spec(path, "preference", skipInvalid=True))
    assert len(kept) == 2 and kept.skipped == 4
    with pytest.raises(DataError, match="no rows"):
        load_preference_rows(spec(write(tmp_path, ["{}"]), "preference", skipInvalid=True))


def test_ranked_rows_expand_into_every_ordered_pair(tmp_path: Path) -> None:
    row = RankedRow("p", ("a", "b", "c", "d"), (1.0, 0.5, 0.0, 0.0))
    pairs = expand_pairs(row)
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [
        ("a", "b", 0.5), ("a", "c", 1.0), ("a", "d", 1.0), ("b", "c", 0.5), ("b", "d", 0.5),
    ]  # fmt: skip
    rec = {"prompt": "p", "responses": list(row.responses), "rewards": list(row.rewards or ())}
    assert load_preference_rows(spec(write(tmp_path, [rec]), "ranked")) == pairs


def test_ranked_rewards_may_be_left_to_a_scorer(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "p", "responses": [" a", " b"]}])
    with pytest.raises(DataError, match='"rewards" must be a non-empty list'):
        load_ranked_rows(spec(path, "ranked"))
    [row] = load_ranked_rows(spec(path, "ranked"), need_rewards=False)
    assert row.rewards is None and row.responses == (" a", " b")
    pairs = write(tmp_path, [{"prompt": "p", "chosen": " a", "rejected": " b"}], "pairs.jsonl")
    assert load_ranked_rows(spec(pairs, "preference")) == [RankedRow("p", (" a", " b"), (1.0, 0.0))]


def test_eval_split_and_path_are_checked() -> None:
    with pytest.raises(ValueError, match="evalPath"):
        DatasetSpec.model_validate({"name": "org/data", "evalPath": "x.jsonl"})
    with pytest.raises(ValueError, match="evalSplit"):
        DatasetSpec.model_validate({"path": "x.jsonl", "evalSplit": "test"})
    with pytest.raises(ValueError, match="one of"):
        DatasetSpec.model_validate({"path": "x.jsonl", "evalPath": "y", "evalFraction": 0.1})
    held_out = DatasetSpec.model_validate({"name": "org/data", "evalSplit": "test"}).held_out()
    assert held_out is not None and held_out.split == "test"


def config(tiny_model_dir: Path, dataset: Path, stage_type: str, **extra: Any) -> StageConfig:
    return StageConfig.model_validate(
        {
            "run": "r", "stage": "s", "type": stage_type, "outputDir": "out",
            "model": ModelSource(path=str(tiny_model_dir)).dump(),
            "dataset": spec(dataset, "preference" if "pref" in dataset.name else "ranked").dump(),
            "hyperparameters": {"batchSize": 4},
            **extra,
        }
    )  # fmt: skip


def test_preflight_refuses_what_the_trainers_cannot_do(
    tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    pref, ranked = fixtures_dir / "preference.jsonl", fixtures_dir / "ranked.jsonl"
    hinge = DPOOptions(loss_type="hinge", label_smoothing=0.1).dump()
    with pytest.raises(UserError, match=r"dpo\.labelSmoothing"):
        check_dpo(config(tiny_model_dir, pref, "dpo", dpo=hinge), 1)
    online = RRHFOptions(online=True).dump()  # the operator renders its servers in `rollout`
    with pytest.raises(UserError, match=r"^rollout: .*rlhf run"):
        check_rrhf(config(tiny_model_dir, ranked, "rrhf", rrhf=online), 1)
    with pytest.raises(UserError, match=r"lora\.merge"):
        check_reward(config(tiny_model_dir, pref, "reward", lora={"merge": False}), 1)
    with pytest.raises(UserError, match="unknown reward function"):
        check_rrhf(config(tiny_model_dir, ranked, "rrhf", rewardFunction="nope"), 1)
    assert LoRAOptions().merge is True


def test_preflight_scores_rrhf_rows_with_a_reward_function(
    tiny_model_dir: Path, fixtures_dir: Path
) -> None:
    ranked = fixtures_dir / "ranked.jsonl"
    inputs = check_rrhf(config(tiny_model_dir, ranked, "rrhf", rewardFunction="animal_sounds"), 2)
    assert len(inputs.train_rows) == 100 and inputs.micro_batch == 2
    from rlhf_trainer.tasks import animal_sounds as tasks

    for row in inputs.train_rows[:10]:
        assert row.rewards == tuple(tasks.check(row.prompt, r) for r in row.responses)
    reward = check_reward(config(tiny_model_dir, ranked, "reward"), 1)
    assert len(reward.train_rows) == 500  # 5 ordered pairs from each 4-response row


def test_offline_rrhf_takes_module_reward_functions(
    tiny_model_dir: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`module:callable` resolves as in GRPO: refused off the allow-list, scored on it."""
    from rlhf_trainer.rewards.functions import ALLOW_ENV
    from rlhf_trainer.tasks import animal_sounds as tasks

    name = "rlhf_trainer.tasks.animal_sounds:check"
    stage = config(tiny_model_dir, fixtures_dir / "ranked.jsonl", "rrhf", rewardFunction=name)
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    refused = r"^reward\.function: module 'rlhf_trainer\.tasks\.animal_sounds' is not on"
    with pytest.raises(UserError, match=refused):
        check_rrhf(stage, 1)
    monkeypatch.setenv(ALLOW_ENV, "rlhf_trainer.tasks.animal_sounds")
    inputs = check_rrhf(stage, 1)
    for row in inputs.train_rows[:10]:
        assert row.rewards == tuple(tasks.check(row.prompt, r) for r in row.responses)


@pytest.mark.parametrize("stage_type", ["reward", "dpo", "rrhf"])
def test_bad_row_stops_the_trainer_before_anything_is_written(
    stage_type: str,
    tiny_model_dir: Path,
    fixtures_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The row is checked in preflight, before torch loads; one error line, nothing written.
    With dataset.skipInvalid the row is left out and counted."""
    from rlhf_trainer.__main__ import main

    monkeypatch.setenv("RLHF_WORKSPACE", str(tmp_path))
    lines = (fixtures_dir / "preference.jsonl").read_text().splitlines()
    broken = json.loads(lines[4])
    del broken["rejected"]
    write(tmp_path, [*lines[:4], json.dumps(broken), *lines[5:]], "pairs.jsonl")
    fields: dict[str, Any] = {"run": "r", "stage": "s", "type": stage_type, "outputDir": "out",
                              "model": {"path": str(tiny_model_dir)},
                              "hyperparameters": {"batchSize": 4}}  # fmt: skip
    fields["dataset"] = {"path": "pairs.jsonl", "format": "preference"}
    config = tmp_path / "stage.yaml"
    config.write_text(StageConfig.model_validate(fields).to_yaml())
    assert main([stage_type, "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        'error: pairs.jsonl line 5: missing field "rejected"; each row needs {"prompt", '
        '"chosen", "rejected"} and an optional number "margin"'
    ]
    assert not (tmp_path / "out").exists()
    fields["dataset"]["skipInvalid"] = True
    config.write_text(StageConfig.model_validate(fields).to_yaml())
    caplog.set_level("INFO")
    assert main([stage_type, "--config", str(config), "--validate-only"]) == 0
    assert "199 training rows" in caplog.text and "1 invalid rows skipped" in caplog.text
    assert not (tmp_path / "out").exists()
