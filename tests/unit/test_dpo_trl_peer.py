"""Peer cross-check: our DPO loss against TRL's DPOTrainer on the same model and tensors.

TRL (>= 1.0) computes the loss inside `DPOTrainer._compute_loss` from a batch of
[chosen; rejected] sequences with a completion mask; with `precompute_ref_log_probs` it takes the
reference log-probs from the batch. We feed it a batch and the same tensors to
`losses.sequence_logprobs` + `losses.dpo_loss`. Conservative DPO (label smoothing) is not
compared: TRL 1.x no longer applies label smoothing to its sigmoid loss (only to variants such
as `robust`), so it is checked against the naive reference only (test_preference_losses.py).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_trainer.algos.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def trl_setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = {"prompt": ["What does the cow say?\nAnswer:"] * 2, "chosen": [" moo."] * 2,
            "rejected": [" woof.", " it goes baa."]}  # fmt: skip
    return {
        "model": model,
        "tokenizer": tokenizer,
        "dataset": datasets.Dataset.from_dict(rows),
        "out": tmp_path_factory.mktemp("trl"),
    }


def batch(tokenizer: Any, n: int) -> dict[str, torch.Tensor]:
    """n random [chosen; rejected] sequences: a prompt of 3-6 tokens, completions of 1-8."""
    gen = torch.Generator().manual_seed(n)
    seqs, masks = [], []
    for _ in range(2 * n):
        prompt, completion = (
            int(torch.randint(3, 7, (1,), generator=gen)),
            int(torch.randint(1, 9, (1,), generator=gen)),
        )
        ids = torch.randint(5, len(tokenizer), (prompt + completion,), generator=gen)
        seqs.append(ids)
        masks.append(torch.tensor([0] * prompt + [1] * completion))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((2 * n, width), tokenizer.pad_token_id)
    attention = torch.zeros(2 * n, width, dtype=torch.long)
    completion = torch.zeros(2 * n, width, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        input_ids[i, : len(s)], attention[i, : len(s)], completion[i, : len(s)] = s, 1, m
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_agrees_with_trl(trl_setup: dict[str, Any], loss_type: str, beta: float) -> None:
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = trl_setup["model"], trl_setup["tokenizer"]
    args = DPOConfig(
        output_dir=str(trl_setup["out"]), beta=beta, loss_type=[loss_type],
        precompute_ref_log_probs=True, report_to=[], use_cpu=True, per_device_train_batch_size=2,
        max_length=64, logging_steps=1000, save_strategy="no",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=trl_setup["dataset"], processing_class=tokenizer
        )
    inputs = batch(tokenizer, 4)
    gen = torch.Generator().manual_seed(7)
    ref_c, ref_r = (torch.randn(4, generator=gen) * 3 - 15 for _ in range(2))
    model.eval()
    with torch.no_grad():
        theirs = trainer._compute_loss(
            trainer.model, {**inputs, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}, False
        )
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    logp, lengths = sequence_logprobs(logits, labels)
    (chosen, rejected), (n_c, n_r) = logp.chunk(2), lengths.chunk(2)
    ours = dpo_loss(
        chosen, rejected, ref_c, ref_r, beta=beta, loss_type=loss_type,
        chosen_lengths=n_c, rejected_lengths=n_r,
    ).losses.mean()  # fmt: skip
    print(f"{loss_type} beta {beta}: TRL {float(theirs):.8f}, ours {float(ours):.8f}")
    assert abs(float(theirs) - float(ours)) <= 1e-5 * max(1.0, abs(float(ours)))
