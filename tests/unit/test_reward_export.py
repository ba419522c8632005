"""A reward model the `reward` stage saves scores the same through Hugging Face's own
`AutoModelForSequenceClassification` as through the trainer (issue 25, item 5).

HF pools at the rightmost token that is not `config.pad_token_id`; training pools at the last
attention-mask position, the EOS. With pad = EOS (a tokenizer without a pad token, or SmolLM2's)
HF used to read the token before EOS. The tiny model's tokenizer has its own `<pad>`, so these
tests save a copy whose pad is EOS, as such models ship.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_trainer.config import WORKSPACE_ENV, StageConfig
from rlhf_trainer.data.batching import tokenize_sft
from rlhf_trainer.data.readers import SFTRow
from rlhf_trainer.models.reward_model import reward_pad_id

pytestmark = pytest.mark.unit

PAIRS = [
    ("What does the cow say?\nAnswer:", " moo."),
    ("What does the cow say?\nAnswer:", " it goes woof, woof, and then it goes baa."),
    ("Note 3. Rain had fallen all night long. Which sound does a duck make?\nAnswer:", " quack."),
    ("Tell me the sound of the owl.\nAnswer:", " hoot."),
    ("The farmer walked slowly to the barn. What noise comes from a pig?\nAnswer:", " oink oink."),
    ("Q?\nAnswer:", " x"),
]


@pytest.fixture(scope="module")
def pad_is_eos(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with pad = EOS in its tokenizer and config."""
    from transformers import AutoTokenizer

    from rlhf_trainer.models.tiny import portable_tokenizer_config

    out = tmp_path_factory.mktemp("pad-eos") / "model"
    shutil.copytree(tiny_model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    portable_tokenizer_config(out / "tokenizer_config.json")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "pad_token_id": config["eos_token_id"]}))
    return out


@pytest.fixture(scope="module")
def reward_final(
    pad_is_eos: Path, fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A reward stage run in this process (20 steps, so the head reads more than noise)."""
    from rlhf_trainer.__main__ import main

    workspace = tmp_path_factory.mktemp("rm")
    shutil.copy(fixtures_dir / "preference.jsonl", workspace / "pairs.jsonl")
    config = StageConfig.model_validate(
        {"run": "r", "stage": "rm", "type": "reward", "outputDir": "runs/rm",
         "model": {"path": str(pad_is_eos)},
         "dataset": {"path": "pairs.jsonl", "format": "preference"},
         "hyperparameters": {"maxSteps": 20, "learningRate": 2e-3, "batchSize": 8,
                             "maxLength": 64, "saveEvery": 100, "seed": 0}}
    )  # fmt: skip
    (workspace / "rm.yaml").write_text(config.to_yaml())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(WORKSPACE_ENV, str(workspace))
        mp.setenv("RLHF_METRICS_PORT", "0")
        assert main(["reward", "--config", str(workspace / "rm.yaml")]) == 0
    yield workspace / "runs" / "rm" / "final"


def hf_model(final: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()


def test_hf_scores_as_the_trainer_without_and_with_padding(reward_final: Path) -> None:
    from rlhf_trainer.models.reward_model import load_reward_model

    scorer = load_reward_model(reward_final)
    ours = torch.tensor(scorer.score([p for p, _ in PAIRS], [r for _, r in PAIRS]))
    tokenizer, model = scorer.tokenizer, hf_model(reward_final)
    examples = tokenize_sft([SFTRow(p, r) for p, r in PAIRS], tokenizer, 512)
    ids = [e.input_ids for e in examples]
    assert len({len(i) for i in ids}) == len(ids) and all(
        i[-1] == tokenizer.eos_token_id for i in ids
    )
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([i])).logits[0, 0] for i in ids])
        before_eos = torch.stack(
            [model(input_ids=torch.tensor([i[:-1]])).logits[0, 0] for i in ids]
        )
        batches = {}
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            batches[side] = model(**batch).logits[:, 0]
    tokenizer.padding_side = "right"
    print(
        f"trainer {ours.tolist()}\nHF, one by one {alone.tolist()}\n"
        f"HF at the token before EOS (the old reading) {before_eos.tolist()}"
    )
    assert torch.allclose(alone, ours, atol=1e-5, rtol=0)
    assert torch.allclose(batches["right"], ours, atol=1e-5, rtol=0)
    assert torch.allclose(batches["left"], ours, atol=1e-5, rtol=0)
    gap = float((before_eos - ours).abs().max())
    print(f"largest gap of the old reading: {gap:.4f}")
    assert not torch.allclose(before_eos, ours, atol=1e-5, rtol=0)  # the old reading fails


def test_saved_pad_is_no_end_token_and_text_encodes_as_before(
    reward_final: Path, pad_is_eos: Path
) -> None:
    from transformers import AutoTokenizer

    config = json.loads((reward_final / "config.json").read_text())
    saved, original = (
        AutoTokenizer.from_pretrained(reward_final),
        AutoTokenizer.from_pretrained(pad_is_eos),
    )
    assert config["pad_token_id"] == saved.pad_token_id == saved.unk_token_id
    assert config["pad_token_id"] != config["eos_token_id"] == saved.eos_token_id
    text = "Echo: cow\nAnswer: moo.</s>"
    assert saved(text)["input_ids"] == original(text)["input_ids"]
    assert saved.decode(saved(text)["input_ids"]) == original.decode(original(text)["input_ids"])


class StubTokenizer:
    """What `reward_pad_id` reads of a tokenizer."""

    chat_template = None

    def __init__(self, pad: int | None, unk: int | None, added: dict[int, str]) -> None:
        self.eos_token_id, self.bos_token_id = 2, 1
        self.pad_token_id, self.unk_token_id = pad, unk
        self.added_tokens_decoder = added
        self.pad_token = "<eos>" if pad == 2 else None

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.added_tokens_decoder.get(i, f"tok{i}")


@pytest.mark.parametrize(
    ("pad", "unk", "added", "vocab", "expected"),
    [
        (3, 0, {}, 10, 3),  # its own pad, not EOS: kept
        (2, 0, {}, 10, 0),  # pad = EOS: unk
        (None, 0, {}, 10, 0),
        (2, 2, {5: "<|reserved_0|>", 7: "<|finetune_right_pad_id|>"}, 10, 7),  # Llama 3.1
        (2, 1, {}, 10, 2),  # unk = BOS and nothing else: EOS stays, with a warning
        (2, 12, {}, 10, 2),  # unk without an embedding row
    ],
)
def test_reward_pad_id_rules(
    pad: int | None, unk: int | None, added: dict[int, str], vocab: int, expected: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    tokenizer = StubTokenizer(pad, unk, added)
    if pad is None:
        tokenizer.pad_token_id, tokenizer.pad_token = 2, "<eos>"  # as load_tokenizer sets it
    assert reward_pad_id(tokenizer, vocab) == expected
    assert tokenizer.pad_token == (
        "<eos>" if expected == 2 else tokenizer.convert_ids_to_tokens(expected)
    )
    assert ("no token to pad with" in caplog.text) == (expected == 2)
