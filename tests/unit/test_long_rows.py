"""Rows of megabytes are cut (plain rows) or refused (chat rows) before tokenizing: the trainer
used to tokenize a 50 MB row in full, for minutes, with no output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from rlhf_trainer.data.batching import char_budget, tokenize_sft
from rlhf_trainer.data.readers import SFTRow
from rlhf_trainer.errors import DataError

pytestmark = pytest.mark.unit

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_cut_keeps_what_truncation_keeps(tokenizer: Any) -> None:
    """A prompt and response a few times the budget tokenize to the same example with and
    without the cut: only text that truncation drops is left out."""
    budget = char_budget(tokenizer, MAX_LENGTH)
    words = " ".join(f"cow{i % 97} says moo" for i in range(budget // 4))
    row = SFTRow(prompt=words + " end of the prompt:", response=" start " + words)
    [cut] = tokenize_sft([row], tokenizer, MAX_LENGTH)
    p = list(tokenizer(row.prompt)["input_ids"])
    r = list(tokenizer(row.response, add_special_tokens=False)["input_ids"])[:MAX_LENGTH]
    p = p[len(p) - (MAX_LENGTH - len(r)) :] if len(p) + len(r) > MAX_LENGTH else p
    assert cut.input_ids == p + r and len(cut.input_ids) == MAX_LENGTH


def test_a_row_of_megabytes_is_cut_or_refused_by_its_length(tokenizer: Any) -> None:
    """The chat row is refused by its character count (the message says characters, not the
    token count a tokenizing pass would give)."""
    huge = "moo " * 2_000_000  # 8 MB
    [example] = tokenize_sft([SFTRow(prompt="say:", response=huge)], tokenizer, MAX_LENGTH)
    with pytest.raises(DataError, match=r"row 7: the rendered conversation is 8000009 characters"):
        tokenize_sft([SFTRow("say:", huge + "!" * 5, chat=True, where="row 7")], tokenizer,
                     MAX_LENGTH)  # fmt: skip
    assert len(example.input_ids) == MAX_LENGTH
