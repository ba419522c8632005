"""`rlhf eval`'s greedy answers come from the in-process decoder of `engine: trainer`: the same
tokens HF `generate` gives, and the response count without a forward pass matches the one
`nll_and_kl` takes from the logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf_trainer.config import ModelSource
from rlhf_trainer.data.batching import stop_ids
from rlhf_trainer.data.inputs import EvalInputs
from rlhf_trainer.data.readers import SFTRow
from rlhf_trainer.evaluate.stage import generate, nll_and_kl, response_tokens
from rlhf_trainer.models.causal_lm import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.unit

PROMPTS = ["the cat says", "a dog", "the cow goes moo and the sheep says", "owl"]


def hf_greedy(model: torch.nn.Module, tokenizer: object, prompts: list[str], new: int) -> list[str]:
    out = []
    for prompt in prompts:  # one at a time: no padding to tell apart
        enc = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
        ids = model.generate(  # type: ignore[operator]
            **enc, max_new_tokens=new, do_sample=False, use_cache=True,
            eos_token_id=sorted(stop_ids(tokenizer)), pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        )  # fmt: skip
        text = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]
        out.append(str(text))
    return out


def test_eval_answers_match_hf_generate_and_count_their_tokens(tiny_model_dir: Path) -> None:
    source = ModelSource(path=str(tiny_model_dir))
    tokenizer = load_tokenizer(source, str(tiny_model_dir))
    model, _ = load_causal_lm(source, str(tiny_model_dir))
    model.eval()
    ours = generate(model, tokenizer, PROMPTS, 12, batch_size=3)  # two batches, left-padded
    assert ours == hf_greedy(model, tokenizer, PROMPTS, 12)
    rows = [SFTRow(p, r) for p, r in zip(PROMPTS, ours, strict=True)]
    inputs = EvalInputs({"p": str(tiny_model_dir)}, [], batch_size=3, max_length=64)
    counted = nll_and_kl(model, None, rows, tokenizer, inputs)["tokens"]
    assert response_tokens(rows, tokenizer, 64) == counted > len(PROMPTS)
