"""`determinism.disable_dropout` and its use in the dpo stage: passes that must repeat do.

A Llama with `attention_dropout` keeps the rate as a float on each attention module (TRL's
`disable_dropout_in_model`, which sets `nn.Dropout.p` only, leaves it on); GPT-2 and LoRA use
`nn.Dropout` modules. In train mode two identical forwards differ until dropout is off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rlhf_trainer.algos.losses import token_logprobs
from rlhf_trainer.config import StageConfig
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import PreferenceRow
from rlhf_trainer.runtime.determinism import disable_dropout
from rlhf_trainer.runtime.distributed import DistContext

pytestmark = pytest.mark.unit

IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 8], [1, 6, 6, 30, 2, 11, 4, 9]])


def tiny_llama(attention_dropout: float) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         attention_dropout=attention_dropout)  # fmt: skip
    config._attn_implementation = "eager"  # the dropout sits in eager and sdpa alike
    return LlamaForCausalLM(config)  # type: ignore[no-untyped-call]


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)  # fmt: skip
    return GPT2LMHeadModel(config)  # type: ignore[no-untyped-call]


def logprobs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    return token_logprobs(logits[:, :-1], IDS[:, 1:])


@pytest.mark.parametrize("build", [lambda: tiny_llama(0.3), tiny_gpt2], ids=["llama", "gpt2"])
def test_two_train_mode_passes_agree_once_dropout_is_off(build: Any) -> None:
    model = build().train()
    before = [logprobs(model) for _ in range(2)]
    assert not torch.equal(before[0], before[1])  # dropout on: every pass draws a new mask
    config = model.config.to_dict()
    assert disable_dropout(model) > 0
    after = [logprobs(model) for _ in range(2)]
    assert torch.equal(after[0], after[1])
    assert model.training and model.config.to_dict() == config  # saved config unchanged
    assert torch.allclose(after[0], logprobs(model.eval()))  # train mode = eval mode now
    assert disable_dropout(model) == 0


def test_lora_dropout_is_switched_off_too() -> None:
    from peft import LoraConfig, get_peft_model

    model: Any = get_peft_model(
        tiny_llama(0.0), LoraConfig(r=4, lora_dropout=0.2, target_modules=["q_proj", "v_proj"])
    )
    assert disable_dropout(model) == 4  # 2 layers x (q_proj, v_proj)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)


@pytest.fixture
def dropout_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with attention_dropout 0.3 in its saved config."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_policy_and_reference_passes_repeat(
    dropout_model: Path, ctx: DistContext, lora: bool
) -> None:
    """dpo.load_models: the policy trains in train mode and, with LoRA, is the reference with
    adapters off; both give the same log-probs twice (they differed before)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_trainer.data.batching import tokenize_pairs
    from rlhf_trainer.offline.dpo import DPOObjective, load_models

    config = StageConfig.model_validate(
        {"run": "r", "stage": "dpo", "type": "dpo", "outputDir": "runs/dpo",
         "model": {"path": str(dropout_model)},
         "dataset": {"path": "p.jsonl", "format": "preference"},
         **({"lora": {"r": 4, "dropout": 0.1, "targetModules": ["q_proj"]}} if lora else {})}
    )  # fmt: skip
    rows = [
        PreferenceRow("What does the cow say?\nAnswer:", " moo.", " woof."),
        PreferenceRow("What does the owl say?\nAnswer:", " hoot.", " it goes baa."),
    ]
    inputs = StageInputs(config, str(dropout_model), rows, [], 2, 1)
    model, _, _, reference = load_models(inputs, ctx)
    assert (reference is None) == lora and model.training
    tokenizer = AutoTokenizer.from_pretrained(dropout_model)
    pairs = tokenize_pairs(rows, tokenizer, 64)
    objective = DPOObjective(model, reference, pairs, [], inputs, ctx, tokenizer.pad_token_id)
    with torch.no_grad():
        runs = [objective._logps(model, pairs) for _ in range(2)]
        raw = AutoModelForCausalLM.from_pretrained(dropout_model).train()
        raw_runs = [objective._logps(raw, pairs) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert not torch.equal(raw_runs[0][0], raw_runs[1][0])  # the model as loaded: dropout on
    ref_runs = [objective._ref_logps("train", [0, 1]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*ref_runs, strict=True))
