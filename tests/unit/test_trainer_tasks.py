"""The animal-sounds task: the scorer, the generator, and the committed fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_trainer import tasks

pytestmark = pytest.mark.unit


def read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("response", "score"),
    [
        (" moo.", 1.0),
        ("moo", 1.0),
        (" Moo! moo", 1.0),
        (" it goes moo.", 0.5),
        (" woof.", 0.0),
        ("", 0.0),
        (" mooo", 0.0),
    ],
)
def test_check_scores(response: str, score: float) -> None:
    assert tasks.check("A dog barked. What does the cow say?\nAnswer:", response) == score


def test_check_uses_the_last_animal_and_whole_words() -> None:
    assert tasks.check("The dog slept. Which sound does a cat make?\nAnswer:", " meow.") == 1.0
    assert tasks.check("No animals here, not even a category.\nAnswer:", " meow.") == 0.0
    assert tasks.asked_animal("Bees been here? What does the bee say?") == "bee"


def test_every_template_and_animal_round_trips() -> None:
    examples = tasks.unique_examples(11, 300)
    assert {ex.animal for ex in examples} == set(tasks.SOUNDS)
    for ex in examples:
        assert ex.prompt.endswith("\nAnswer:")
        assert tasks.asked_animal(ex.prompt) == ex.animal
        assert tasks.check(ex.prompt, ex.response) == 1.0
    assert len({ex.prompt for ex in examples}) == 300
    assert tasks.unique_examples(11, 300) == examples  # seeded
    assert all(tasks.asked_animal(f) is None for f in tasks.FILLERS)


def test_fixtures_agree_with_the_scorer(fixtures_dir: Path) -> None:
    train = read(fixtures_dir / "sft.jsonl")
    held_out = read(fixtures_dir / "sft_eval.jsonl")
    assert len(train) >= 300 and len(held_out) == 50
    assert all(tasks.check(r["prompt"], r["response"]) == 1.0 for r in train)  # type: ignore[arg-type]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for r in held_out:
        assert tasks.check(str(r["prompt"]), f" {r['answer']}.") == 1.0
    for r in read(fixtures_dir / "preference.jsonl"):
        assert tasks.check(str(r["prompt"]), str(r["chosen"])) == 1.0
        assert tasks.check(str(r["prompt"]), str(r["rejected"])) == 0.0
    for r in read(fixtures_dir / "ranked.jsonl"):
        responses, rewards = r["responses"], r["rewards"]
        assert isinstance(responses, list) and isinstance(rewards, list) and len(responses) == 4
        assert rewards == [tasks.check(str(r["prompt"]), x) for x in responses]
        assert sorted(rewards) == [0.0, 0.0, 0.5, 1.0]
    assert tasks.REWARD_FUNCTIONS["animal_sounds"] is tasks.check


def test_fixtures_regenerate_byte_identical(fixtures_dir: Path, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_fixtures", fixtures_dir / "make_fixtures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in fixtures_dir.glob("*.jsonl"))
    for name in names:
        assert (tmp_path / name).read_bytes() == (fixtures_dir / name).read_bytes(), name
