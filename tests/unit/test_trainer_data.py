"""Dataset readers: every format parses the fixtures; every bad row names its line and field."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from rlhf_trainer.config import WORKSPACE_ENV, DatasetSpec
from rlhf_trainer.data.formats import split_hh
from rlhf_trainer.data.readers import (
    PreferenceRow,
    PromptRow,
    RankedRow,
    SFTRow,
    load_preference_rows,
    load_prompt_rows,
    load_ranked_rows,
    load_sft_rows,
    split_eval,
)
from rlhf_trainer.errors import DataError

pytestmark = pytest.mark.unit


def spec(path: Path | str, fmt: str = "jsonl") -> DatasetSpec:
    return DatasetSpec.model_validate({"path": str(path), "format": fmt})


def test_fixtures_parse_in_every_format(fixtures_dir: Path) -> None:
    sft = load_sft_rows(spec(fixtures_dir / "sft.jsonl"))
    assert len(sft) == 400 and all(isinstance(r, SFTRow) for r in sft)
    pref = load_preference_rows(spec(fixtures_dir / "preference.jsonl", "preference"))
    assert len(pref) == 200 and all(isinstance(r, PreferenceRow) for r in pref)
    ranked = load_ranked_rows(spec(fixtures_dir / "ranked.jsonl", "ranked"))
    assert all(isinstance(r, RankedRow) and len(r.responses) == 4 for r in ranked)
    prompts = load_prompt_rows(spec(fixtures_dir / "prompts.jsonl", "prompts"))
    assert all(isinstance(r, PromptRow) and r.answer for r in prompts)
    hh = load_preference_rows(spec(fixtures_dir / "hh.jsonl", "hh"))
    assert len(hh) == 20
    assert all(
        r.prompt.endswith("\n\nAssistant:") and r.prompt.startswith("\n\nHuman:") for r in hh
    )


def test_hh_sft_takes_chosen_after_last_assistant_turn(tmp_path: Path) -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what does the cow say?\n\nAssistant: moo."
    row = {"chosen": chosen, "rejected": chosen.replace("moo.", "woof.")}
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [sft] = load_sft_rows(spec(path, "hh"))
    assert (
        sft.prompt
        == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what does the cow say?\n\nAssistant:"
    )
    assert sft.response == " moo."
    [pair] = load_preference_rows(spec(path, "hh"))
    assert (pair.chosen, pair.rejected) == (" moo.", " woof.")
    assert split_hh("\n\nAssistant:", "chosen", "x") == ("\n\nAssistant:", "")


def test_relative_paths_resolve_against_the_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n')
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path))
    assert load_sft_rows(spec("data/sft.jsonl")) == [SFTRow("a", "b")]


GOOD: dict[str, dict[str, Any]] = {
    "jsonl": {"prompt": "p", "response": "r"},
    "preference": {"prompt": "p", "chosen": "c", "rejected": "r", "margin": 0.5},
    "ranked": {"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0.5]},
    "prompts": {"prompt": "p", "answer": "moo"},
    "hh": {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
}

# (format, row, field named in the message, what the message says)
BAD: list[tuple[str, Any, str, str]] = [
    ("jsonl", {"prompt": "p"}, '"response"', "missing field"),
    ("jsonl", {"response": "r"}, '"prompt"', "missing field"),
    ("jsonl", {"prompt": "p", "response": 3}, '"response"', "must be a string, got int"),
    ("jsonl", ["p", "r"], "JSON object", "expected a JSON object, got list"),
    ("preference", {"prompt": "p", "chosen": "c"}, '"rejected"', "missing field"),
    ("preference", {**GOOD["preference"], "margin": "big"}, '"margin"', "must be a number"),
    ("ranked", {**GOOD["ranked"], "rewards": [1]}, '"rewards"', "same length"),
    ("ranked", {**GOOD["ranked"], "responses": "a"}, '"responses"', "list of strings"),
    ("ranked", {**GOOD["ranked"], "rewards": [True, 1]}, '"rewards"', "list of numbers"),
    ("prompts", {"prompt": "p", "answer": 1}, '"answer"', "must be a string"),
    ("hh", {"chosen": "no turns", "rejected": "x"}, '"chosen"', "Assistant:"),
]


@pytest.mark.parametrize(("fmt", "row", "field", "what"), BAD)
def test_bad_row_names_file_line_and_field(
    tmp_path: Path, fmt: str, row: Any, field: str, what: str
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{json.dumps(GOOD[fmt])}\n\n{json.dumps(row)}\n")
    loader = {
        "jsonl": load_sft_rows,
        "preference": load_preference_rows,
        "ranked": load_ranked_rows,
        "prompts": load_prompt_rows,
        "hh": load_preference_rows,
    }[fmt]
    with pytest.raises(DataError) as err:
        loader(spec(path, fmt))
    message = str(err.value)
    assert message.startswith(f"{path} line 3: "), message
    assert field in message and what in message
    assert "; " in message and "\n" not in message  # one line: what is wrong; the fix


def test_the_documented_example_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path))
    (tmp_path / "data").mkdir()
    rows = [GOOD["jsonl"]] * 6 + [{"prompt": "p"}]
    (tmp_path / "data" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_sft_rows(spec("data/sft.jsonl"))
    assert str(err.value) == (
        'data/sft.jsonl line 7: missing field "response"; each row needs {"prompt", "response"}'
    )


def test_invalid_json_missing_file_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        load_sft_rows(spec(path))
    with pytest.raises(DataError, match=r"dataset file not found \(looked at .*nope.jsonl\)"):
        load_sft_rows(spec(tmp_path / "nope.jsonl"))
    path.write_text("\n")
    with pytest.raises(DataError, match="the dataset has no rows"):
        load_sft_rows(spec(path))


def test_hh_pairs_whose_earlier_turns_differ_are_refused_or_skipped(tmp_path: Path) -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: cow?\n\nAssistant: moo."
    good = {"chosen": chosen, "rejected": chosen.replace("moo.", "woof.")}
    bad = {"chosen": chosen, "rejected": chosen.replace("cow?", "dog?").replace("moo.", "woof.")}
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"line 2: .*differ before their last Assistant turn"):
        load_preference_rows(spec(path, "hh"))
    lenient = DatasetSpec.model_validate({"path": str(path), "format": "hh", "skipInvalid": True})
    rows = load_preference_rows(lenient)
    assert [r.rejected for r in rows] == [" woof."] and rows.skipped == 1


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0c", "\x1c"])
def test_line_separators_inside_strings_stay_in_their_row(tmp_path: Path, separator: str) -> None:
    """`json.dumps(ensure_ascii=False)` and `jq -c` leave these raw inside strings;
    `str.splitlines` cut such a row into invalid pieces."""
    rows = [{"prompt": f"a{separator}b", "response": "r"}, {"prompt": "p", "response": "s"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    loaded = load_sft_rows(spec(path))
    assert [r.prompt for r in loaded] == [f"a{separator}b", "p"]


def test_a_utf8_bom_and_crlf_line_ends_are_read(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    body = '{"prompt": "p", "response": "r"}\r\n{"prompt": "q", "response": "s"}\r\n'
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [r.prompt for r in load_sft_rows(spec(path))] == ["p", "q"]


def test_format_that_cannot_feed_a_stage(fixtures_dir: Path) -> None:
    with pytest.raises(DataError, match="format 'ranked' cannot feed a sft stage"):
        load_sft_rows(spec(fixtures_dir / "ranked.jsonl", "ranked"))


def test_hub_dataset_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def load_dataset(name: str, split: str, revision: str | None) -> list[dict[str, Any]]:
        calls.append((name, split, revision))
        return [GOOD["hh"], {"chosen": "x", "rejected": "y"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub = DatasetSpec(name="Anthropic/hh-rlhf", format="hh", split="test", revision="abc")
    with pytest.raises(DataError) as err:
        load_sft_rows(hub)
    assert calls == [("Anthropic/hh-rlhf", "test", "abc")]
    assert str(err.value).startswith('dataset Anthropic/hh-rlhf (test) row 1: field "chosen"')


def test_split_eval_takes_the_end() -> None:
    rows = list(range(10))
    assert split_eval(rows, 0.0) == (rows, [])
    assert split_eval(rows, 0.2) == (rows[:8], [8, 9])
    assert split_eval(rows, 0.01) == (rows[:9], [9])
    with pytest.raises(DataError, match="evalFraction"):
        split_eval([1], 0.5)
