"""The animal-sounds task: the scorer, the generator, and the committed fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_trainer.tasks import animal_sounds as tasks

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


def test_judge_fixture_holds_both_orders_of_each_pair_in_one_block(fixtures_dir: Path) -> None:
    """judge_sft.jsonl, trained in file order with batches of 24 rows: each block holds 8
    answers (turn 1), then the verdicts on those 8 prompts in both orders, the right response
    as A and then as B, against the judge's own (right) answer. No prompt of it is among the
    pairs the judge later relabels or the held-out pairs."""
    rows = read(fixtures_dir / "judge_sft.jsonl")
    assert len(rows) % 24 == 0 and len(rows) >= 600
    for start in range(0, len(rows), 24):
        answers, verdicts = rows[start : start + 8], rows[start + 8 : start + 24]
        assert all(str(r["prompt"]).endswith("\n\nAssistant:") for r in answers)
        assert [r["response"] for r in verdicts] == ["A", "B"] * 8
        for answer, (a, b) in zip(
            answers, zip(verdicts[::2], verdicts[1::2], strict=True), strict=True
        ):
            question, right = str(answer["prompt"]), str(answer["response"])
            assert tasks.check(question, right) == 1.0
            shown_a = str(a["prompt"]).rsplit("\nA: ", 1)[1].split("\nB: ")[0]
            shown_b = str(b["prompt"]).rsplit("\nB: ", 1)[1].split("\n\nAssistant:")[0]
            assert shown_a == shown_b == right  # the right one as A, then as B
            assert str(a["prompt"]).startswith(question + f" {right.strip()}")
    judged = read(fixtures_dir / "preference.jsonl") + read(fixtures_dir / "preference_eval.jsonl")
    asked = {
        str(r["prompt"]).removeprefix("Human: ").removesuffix("\n\nAssistant:")
        for r in rows
        if r["response"] not in ("A", "B")  # the answer rows: one per prompt
    }
    assert len(asked) == len(rows) // 3
    assert not asked & {str(r["prompt"]) for r in judged}


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
