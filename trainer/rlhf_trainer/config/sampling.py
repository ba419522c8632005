"""The sampling fields of the stages that generate: rrhf (online), ppo, grpo and feedback sample
from the policy, the judge and evaluate from their own models.

Each field's type and bounds are declared once here; a class gives it its own default and
description. They are annotated types, not a base class, because a base class's fields come
first in its subclasses: the CRD and docs/API.md list fields in class order, which would move.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from rlhf_trainer.config.common import MAX_BATCH, MAX_NEW_TOKENS, MAX_PER_PROMPT

Temperature = Annotated[float, Field(gt=0)]
TopP = Annotated[float, Field(gt=0, le=1)]
MaxNewTokens = Annotated[int, Field(gt=0, le=MAX_NEW_TOKENS)]
SamplesPerPrompt = Annotated[int, Field(ge=2, le=MAX_PER_PROMPT)]
RolloutBatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH)]
# `async` is a Python keyword, hence the alias.
AsyncRollout = Annotated[
    bool,
    Field(
        alias="async",
        description="Generate step t+1 while step t trains (one step off-policy; the "
        "importance ratio uses the rollout servers' behaviour logprobs).",
    ),
]
