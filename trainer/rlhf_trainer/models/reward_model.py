"""Reward models: a scalar head on a transformer backbone, read at the last non-pad token.

On disk a reward model is a Hugging Face sequence classifier with one label
(`AutoModelForSequenceClassification`, e.g. `LlamaForSequenceClassification`), so vLLM, TRL and
OpenRLHF load it as they are. In training it is a `ScalarHeadModel`: the same backbone and
`score` head, called so that the pooled token is found from the attention mask rather than from
the pad token id (which a model without a pad token shares with EOS), plus, for MOSS-RLHF's LM
loss, the causal LM head of the model it started from.

Scoring API (used by the evaluate stage and the online stages):

    scorer = load_reward_model("/workspace/run/rm/final")
    scorer.score(["Q: ...\\nAnswer:"], [" moo."])  # -> [1.73]

Prompt and response are tokenized exactly as in training (`batching.tokenize_sft`: prompt with
the tokenizer's special tokens, then the response and EOS).

The pad token of a saved reward model (`reward_pad_id`). Training reads the reward at the last
position of the attention mask: the EOS that ends each response. Hugging Face's own pooling
(`GenericForSequenceClassification.forward`, transformers 5) ignores the attention mask and
reads the rightmost token whose id is not `config.pad_token_id`. A model without a pad token
gets pad = EOS (`model.load_tokenizer`), and many ship that way (SmolLM2: pad = EOS =
`<|im_end|>`); saved like that, HF took the EOS for padding and read the token before it
(-0.2040 against the trainer's -0.2276 on one input). So the reward stage pads with, and saves
as pad, a token that never ends a sequence: the tokenizer's pad when it is no end token, else
its unk, else an added special token named like a pad (Llama 3.1's `<|finetune_right_pad_id|>`).
Then HF, with or without an attention mask, and vLLM (which reads the last token) all read
the EOS that training scored. Only which id pads changes: the tokenizer encodes and decodes
text as before. The other choice, scoring the token before EOS in training, would have made
the reward depend on whether pad happened to equal EOS and disagreed with vLLM. A tokenizer
with no such token (GPT-2's one `<|endoftext|>` is BOS, EOS and unk) keeps pad = EOS, with a
warning: HF's pooling then reads the token before EOS; `load_reward_model` does not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_trainer.config import LoRAOptions, ModelSource
from rlhf_trainer.data.batching import collate, stop_ids, tokenize_sft
from rlhf_trainer.data.readers import SFTRow
from rlhf_trainer.errors import UserError
from rlhf_trainer.models import lora
from rlhf_trainer.models.causal_lm import Exporter, _hub_kwargs, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T), attention_mask (B, T) -> (B,): the value at the last non-pad position,
    for right or left padding."""
    positions = torch.arange(values.size(1), device=values.device)
    last = (positions * attention_mask).argmax(dim=-1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


class ScalarHeadModel(nn.Module):
    """backbone (a transformer without its LM head) + `score`: Linear(hidden, 1).

    forward(input_ids (B, T), attention_mask (B, T)) -> (values (B, T) float32, LM logits
    (B, T, V) or None): a value for every position; `last_token_values` picks the reward.
    """

    config: Any  # the backbone's PretrainedConfig

    def __init__(self, backbone: nn.Module, score: nn.Linear, lm_head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.score, self.lm_head = backbone, score, lm_head
        self.config = backbone.config
        # FSDP shards the decoder layers found by these class names (distributed.decoder_layers).
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]
        values = self.score(hidden).squeeze(-1).float()
        logits = self.lm_head(hidden) if self.lm_head is not None else None
        return values, logits


def _is_classifier(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or ())


def _from_classifier(ref: str, source: ModelSource | None) -> ScalarHeadModel:
    from transformers import AutoModelForSequenceClassification

    kwargs = _hub_kwargs(source) if source else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        ref, num_labels=1, dtype=torch.float32, **kwargs
    )
    score = getattr(model, "score", None)
    if not isinstance(score, nn.Linear):
        raise UserError(f"model: {ref} is a classifier without a `score` head; use a decoder LM")
    return ScalarHeadModel(getattr(model, model.base_model_prefix), score)


def load_reward_backbone(
    source: ModelSource, ref: str, with_lm_head: bool
) -> tuple[ScalarHeadModel, torch.dtype]:
    """The model a reward stage trains: a reward model it continues, or a causal LM (e.g. the
    SFT output) whose backbone gets a new score head, initialised N(0, 1/(hidden+1)) as in
    OpenRLHF. Returns it in float32 with the dtype its checkpoint was saved in."""
    from transformers import AutoConfig

    config = (
        AutoConfig.from_pretrained(ref, **_hub_kwargs(source))
        if not lora.is_adapter_dir(Path(ref))
        else None
    )
    if config is not None and _is_classifier(config):
        if with_lm_head:
            raise UserError(
                f"rewardModel.lmLossWeight: {ref} is a reward model without an LM head; start "
                "from a causal LM or set lmLossWeight to 0"
            )
        saved = getattr(config, "dtype", None)
        saved = getattr(torch, saved, None) if isinstance(saved, str) else saved
        return _from_classifier(ref, source), saved if isinstance(
            saved, torch.dtype
        ) else torch.float32
    causal: Any
    causal, dtype = load_causal_lm(source, ref)
    hidden = causal.config.hidden_size
    score = nn.Linear(hidden, 1, bias=False)
    nn.init.normal_(score.weight, std=1 / (hidden + 1))
    lm_head = causal.get_output_embeddings() if with_lm_head else None
    backbone = getattr(causal, causal.base_model_prefix)
    return ScalarHeadModel(backbone, score, lm_head), dtype


def _pad_candidates(tokenizer: Any) -> list[int | None]:
    """The tokenizer's pad, its unk, then added special tokens whose text names a pad."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    named = [i for i, t in sorted(added.items()) if "pad" in str(t).lower()]
    return [tokenizer.pad_token_id, tokenizer.unk_token_id, *named]


def reward_pad_id(tokenizer: Any, vocab_size: int) -> int:
    """The pad id a reward model trains and is saved with (module docstring): the first of
    `_pad_candidates` that is neither an end token (`batching.stop_ids`) nor BOS and has an
    embedding row; it becomes `tokenizer.pad_token`, so the saved tokenizer pads with it.
    Without one, the tokenizer's pad (EOS), with a warning."""
    taken = stop_ids(tokenizer) | {tokenizer.bos_token_id}
    for candidate in _pad_candidates(tokenizer):
        if candidate is not None and candidate not in taken and 0 <= candidate < vocab_size:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(candidate))
            return int(candidate)
    log.warning(
        "The tokenizer has no token to pad with other than an end token (%s); Hugging Face's "
        "sequence-classifier pooling will read the reward model at the token before EOS, "
        "training and load_reward_model at EOS",
        tokenizer.pad_token,
    )
    return int(tokenizer.pad_token_id)


def reward_exporter(config: Any, options: LoRAOptions | None, pad_token_id: int) -> Exporter:
    """Full state of a trained ScalarHeadModel -> a `...ForSequenceClassification` (num_labels
    1, LoRA merged, the LM head dropped; `pad_token_id` = `reward_pad_id`, which HF's own
    pooling reads the reward beside)."""

    def export(state: dict[str, Any]) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        cls_config = config.__class__.from_dict({**config.to_dict(), "num_labels": 1})
        cls_config.architectures = None
        cls_config.pad_token_id = pad_token_id
        with torch.device("meta"):
            plain = AutoModelForSequenceClassification.from_config(cls_config)  # type: ignore[no-untyped-call]
            prefix = plain.base_model_prefix
            if options is not None:
                setattr(plain, prefix, lora.apply_lora(getattr(plain, prefix), options))
        renamed = {
            f"{prefix}.{k.removeprefix('backbone.')}" if k.startswith("backbone.") else k: v
            for k, v in state.items()
            if not k.startswith("lm_head.")
        }
        plain.load_state_dict(renamed, assign=True)
        if options is not None:
            setattr(plain, prefix, getattr(plain, prefix).merge_and_unload())
        return plain  # type: ignore[no-any-return]

    return export


class RewardScorer:
    """Scores (prompt, response) pairs with a reward model; plain torch, one process."""

    def __init__(
        self, model: ScalarHeadModel, tokenizer: Any, max_length: int, device: torch.device
    ) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.device = device

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        batch_size: int = 16,
        chat: bool = False,
    ) -> list[float]:
        """One reward per (prompt, response), in order; `chat`: the prompts were rendered with
        a chat template (`SFTRow.chat`)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [SFTRow(p, r, chat=chat) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        for start in range(0, len(rows), batch_size):
            examples = tokenize_sft(
                rows[start : start + batch_size], self.tokenizer, self.max_length
            )
            t = collate(examples, int(self.tokenizer.pad_token_id))
            mask = t["attention_mask"].to(self.device)
            values, _ = self.model(t["input_ids"].to(self.device), mask)
            out.extend(float(v) for v in last_token_values(values, mask))
        return out


def load_reward_model(
    path: str | Path, device: str | torch.device = "cpu", max_length: int = 512
) -> RewardScorer:
    """The reward model in `path` (a `reward` stage's final/), ready to score."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    ref = str(path)
    source = ModelSource(path=ref)
    model = _from_classifier(ref, source)
    target = torch.device(device)
    return RewardScorer(model.to(target), load_tokenizer(source, ref), max_length, target)
