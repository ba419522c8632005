"""Dropout off in the models whose passes must be repeatable.

RLHF compares log-probs of one model across passes: DPO's policy against its reference (with
LoRA, the same model with adapters off), PPO's policy against π_old, the critic's values
against the old values. A dropout mask drawn afresh in each pass turns those comparisons into
noise: two identical forwards of a Llama with `attention_dropout` 0.1 in train mode disagree.
The peers switch it off for every RLHF trainer: TRL's `disable_dropout=True` default in
DPOConfig, GRPOConfig, PPOConfig and RewardConfig (`trl.trainer.utils.disable_dropout_in_model`),
OpenRLHF's zero dropout in its actor and critic.

`disable_dropout` goes further than TRL's helper, which sets `nn.Dropout.p` only: Hugging Face
attention modules keep their rate as a float attribute (`LlamaAttention.attention_dropout`,
read as `0.0 if not self.training else self.attention_dropout`), which TRL leaves on. The
model's `config` is not touched, so a saved model keeps the dropout its config had.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

# Float attributes through which Hugging Face modules pass a dropout rate to their attention
# function (transformers 5: `dropout=0.0 if not self.training else self.<name>`).
RATE_ATTRIBUTES = ("attention_dropout", "dropout", "dropout_prob", "dropout_p", "attn_dropout")


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout of `model` to 0: `p` of each `nn.Dropout` (any `_DropoutNd`, LoRA's
    `lora_dropout` included) and the float rates of `RATE_ATTRIBUTES` on any module. Returns
    how many were above 0. Train mode then changes nothing in a forward but what it should
    (nothing, for the decoder LMs here), so two passes on the same input agree bit for bit.
    Works before or after FSDP2 sharding (the module tree stays)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name in RATE_ATTRIBUTES:
            rate = module.__dict__.get(name)
            if isinstance(rate, float) and rate > 0:
                setattr(module, name, 0.0)
                changed += 1
    if changed:
        log.info("Disabled dropout in %d modules", changed)
    return changed
