"""What the trainers write: LoRA merged or adapter-only, and reward models, reload to the same
outputs as the trained modules (in one process, without FSDP; the torchrun tests cover that)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_trainer.config import LoRAOptions, ModelSource
from rlhf_trainer.models.causal_lm import (
    _write_hf,
    causal_lm_exporter,
    load_causal_lm,
    load_tokenizer,
)
from rlhf_trainer.models.lora import apply_lora
from rlhf_trainer.models.reward_model import (
    ScalarHeadModel,
    last_token_values,
    load_reward_backbone,
    load_reward_model,
    reward_exporter,
)

pytestmark = pytest.mark.unit

OPTIONS = LoRAOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def randomize_adapters(model: torch.nn.Module) -> None:
    """LoRA starts as a no-op (B = 0); give it weights so merging has something to do."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def inputs(tokenizer: Any) -> dict[str, torch.Tensor]:
    enc = tokenizer(["What does the cow say?\nAnswer: moo.", "Hi"], return_tensors="pt",
                    padding=True)  # fmt: skip
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("merge", [True, False])
def test_causal_lora_reloads_to_the_same_logits(
    tiny_model_dir: Path, tmp_path: Path, merge: bool
) -> None:
    source = ModelSource(path=str(tiny_model_dir))
    tokenizer = load_tokenizer(source, str(tiny_model_dir))
    model, _ = load_causal_lm(source, str(tiny_model_dir))
    options = OPTIONS.model_copy(update={"merge": merge})
    export = causal_lm_exporter(model.config, options, str(tiny_model_dir))
    peft_model = apply_lora(model, options)
    randomize_adapters(peft_model)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n for n, _ in peft_model.named_parameters() if "lora_" in n
    }
    batch = inputs(tokenizer)
    with torch.no_grad():
        want = peft_model(**batch).logits
    _write_hf(export(peft_model.state_dict()), tokenizer, tmp_path / "out", torch.float32)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert ("config.json" in written) is merge and ("adapter_config.json" in written) is not merge
    reloaded, _ = load_causal_lm(ModelSource(path=str(tmp_path / "out")), str(tmp_path / "out"))
    with torch.no_grad():
        got = reloaded(**batch).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("lora", [False, True])
def test_reward_model_reloads_to_the_same_scores(
    tiny_model_dir: Path, tmp_path: Path, lora: bool
) -> None:
    source = ModelSource(path=str(tiny_model_dir))
    tokenizer = load_tokenizer(source, str(tiny_model_dir))
    torch.manual_seed(0)
    model, _ = load_reward_backbone(source, str(tiny_model_dir), with_lm_head=True)
    assert model.lm_head is not None
    export = reward_exporter(model.config, OPTIONS if lora else None, tokenizer.pad_token_id)
    if lora:
        model = ScalarHeadModel(apply_lora(model.backbone, OPTIONS), model.score, model.lm_head)
        randomize_adapters(model)
    batch = inputs(tokenizer)
    with torch.no_grad():
        values, logits = model(batch["input_ids"], batch["attention_mask"])
    assert logits is not None and logits.shape[-1] == len(tokenizer)
    want = last_token_values(values, batch["attention_mask"])
    out = tmp_path / "rm"
    _write_hf(export(model.state_dict()), tokenizer, out, torch.float32)
    scorer = load_reward_model(out)
    got = scorer.score(["What does the cow say?\nAnswer:", "Hi"], [" moo.", ""])
    # The scorer tokenizes prompt + response + EOS, the batch above has no EOS: compare the
    # classifier's own pooling on the batch instead, and the scorer for determinism.
    from transformers import AutoModelForSequenceClassification

    classifier: Any = AutoModelForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        pooled = classifier(**batch).logits.squeeze(-1)
    assert torch.allclose(pooled, want, atol=1e-5), (pooled, want)
    assert got == scorer.score(["What does the cow say?\nAnswer:", "Hi"], [" moo.", ""])
    shutil.rmtree(out)
