"""The RLHFRun's metadata and status models: what the operator reads of `metadata` and writes
to `status`. Re-exported by api.py, the module callers import them from.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

from rlhf_trainer.config import ApiModel


class ObjectMeta(ApiModel):
    """The parts of metadata the operator reads."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str = "default"
    uid: str | None = None
    generation: int = 1
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Condition(ApiModel):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int = 0


Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]


def _finite_or_none(value: Any) -> Any:
    """A trainer's NaN or infinite metric reads as unknown: specs refuse non-finite numbers
    (ApiModel), but a diverged run's measurements must never crash the operator."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# A number a trainer measured (status), not one a user wrote (spec).
Measured = Annotated[float | None, BeforeValidator(_finite_or_none)]


class StageMetrics(ApiModel):
    step: int | None = None
    total_steps: int | None = None
    reward: Measured = None
    kl: Measured = None
    loss: Measured = None
    # Stages with an environment: the latest step's mean assistant turns per episode, and
    # its episodes lost to the environment (timeouts, errors, malformed replies).
    episode_turns: Measured = None
    episodes_dropped: Measured = None

    @classmethod
    def from_progress(cls, data: Any) -> StageMetrics | None:
        """Parse the trainer's progress document ({step, totalSteps, metrics: {...}}), the
        shape of progress.json and of the `rlhf.dev/progress` pod annotation; None if odd."""
        if not isinstance(data, dict):
            return None
        raw = data.get("metrics")
        metrics: dict[str, Any] = raw if isinstance(raw, dict) else {}

        def number(value: Any) -> float | None:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return float(value) if ok and math.isfinite(value) else None  # JSON has no NaN

        def integer(value: Any) -> int | None:
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        return cls(
            step=integer(data.get("step")),
            total_steps=integer(data.get("totalSteps")),
            reward=number(metrics.get("reward")),
            kl=number(metrics.get("kl")),
            loss=number(metrics.get("loss")),
            episode_turns=number(metrics.get("episodeTurns")),
            episodes_dropped=number(metrics.get("episodesDropped")),
        )


class StageStatus(ApiModel):
    name: str
    type: str
    phase: Phase = "Pending"
    job_name: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    output: str | None = None
    message: str | None = None
    attempts: int | None = Field(
        default=None, description="Jobs started for the stage so far: 1, plus one per retry."
    )
    metrics: StageMetrics | None = None


class RunStatus(ApiModel):
    phase: Phase = "Pending"
    current_stage: str | None = None
    step: int | None = Field(default=None, description="Step of the current stage.")
    reward: Measured = Field(default=None, description="Latest reward of the current stage.")
    stages: list[StageStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int = 0
