"""The models of the online stages: the policy, the critic, the frozen reference and the reward
model, each loaded in float32 and sharded with FSDP2, with dropout off (`determinism`): π_old,
the critic's values at sampling time and π_ref are forward passes that the loss compares with
later ones, which a fresh dropout mask per pass would turn into noise (TRL's `disable_dropout`,
OpenRLHF)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from rlhf_trainer.config import ModelSource, StageConfig
from rlhf_trainer.models.causal_lm import Exporter, load_causal_lm, load_trainable_lm
from rlhf_trainer.models.reward_model import load_reward_backbone
from rlhf_trainer.runtime.determinism import disable_dropout
from rlhf_trainer.runtime.distributed import DistContext, shard_model

log = logging.getLogger(__name__)


class ValueModel(nn.Module):
    """A transformer backbone and a scalar `score` head: a value for every position.

    forward(input_ids (B, T), attention_mask (B, T), position_ids (B, T)) -> (B, T) float32.
    Position ids pass through, so left-padded rollouts keep their real positions.
    """

    def __init__(self, backbone: nn.Module, score: nn.Module) -> None:
        super().__init__()
        self.backbone, self.score = backbone, score
        self.config: Any = backbone.config
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )[0]
        # A copy, not a view: FSDP2's backward hook must not sit on a view of the head's output.
        values: torch.Tensor = self.score(hidden).squeeze(-1).to(torch.float32, copy=True)
        return values


def load_policy(
    config: StageConfig, model_ref: str, ctx: DistContext
) -> tuple[nn.Module, torch.dtype, Exporter]:
    """The policy to train (`model.load_trainable_lm`: LoRA when set, sharded, train mode)
    with dropout off; its checkpoint dtype and exporter."""
    model, dtype, export = load_trainable_lm(config, model_ref, ctx)
    disable_dropout(model)
    return model, dtype, export


def load_value_model(path: str, trainable: bool, bf16: bool) -> ValueModel:
    """A reward model's folder (a sequence classifier) as a ValueModel; a causal LM's folder
    gets a new score head (N(0, 1/(hidden+1))). Sharded; frozen unless `trainable`."""
    scalar, _ = load_reward_backbone(ModelSource(path=path), path, with_lm_head=False)
    model = ValueModel(scalar.backbone, scalar.score)
    _prepare(model, trainable, bf16)
    return model


def load_reference(source: ModelSource, ref: str, bf16: bool) -> nn.Module:
    """The frozen reference policy: a copy of the initial policy, sharded, in eval mode."""
    model, _ = load_causal_lm(source, ref)
    _prepare(model, trainable=False, bf16=bf16)
    return model


def _prepare(model: nn.Module, trainable: bool, bf16: bool) -> None:
    disable_dropout(model)
    model.requires_grad_(trainable)
    model.train(trainable)
    shard_model(model, bf16)
