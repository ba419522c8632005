"""The servers a stage talks to: rollout, judge and environment. The options a user sets on
them, and the targets (URLs, served model names) the operator fills in for the trainer."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, model_validator
from pydantic.alias_generators import to_camel

from rlhf_trainer.config.common import ApiModel, ModelSource
from rlhf_trainer.config.sampling import MaxNewTokens, TopP


class RolloutClientOptions(ApiModel):
    """How the trainer talks to its rollout servers (OpenAI-compatible HTTP)."""

    timeout_seconds: float = Field(
        default=300.0, gt=0, description="Timeout of one HTTP request to a rollout server."
    )
    max_retries: int = Field(
        default=3, ge=0, description="Retries of a failed request (connection error, 5xx)."
    )
    concurrency: int = Field(
        default=64, gt=0, description="Requests in flight per replica (one per prompt)."
    )
    startup_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="How long the trainer waits for a server to be ready."
    )
    parity_threshold: float = Field(
        default=0.1,
        gt=0,
        description="Mean absolute logprob gap (server vs trainer, on a fixed probe sample) "
        "above which a weight sync is an error.",
    )


# Who generates an online stage's rollouts: vLLM or lmdeploy servers, or the trainer itself.
RolloutEngine = Literal["vllm", "lmdeploy", "trainer"]
IN_TRAINER = "trainer"


class RolloutTarget(RolloutClientOptions):
    """The rollout servers of an online stage, as rendered for the trainer by the operator;
    with engine `trainer`, the trainer's own process generates and there are none."""

    engine: RolloutEngine = "vllm"
    urls: list[str] = Field(
        default_factory=list,
        description="Base URL of each server replica (none with engine `trainer`).",
    )
    served_model: str = Field(description="The model name the servers answer to.")
    weight_sync: Literal["disk", "nccl"] = Field(default="disk")
    lora_adapter: str | None = Field(
        default=None,
        description="LoRA stages: the name the policy's adapter is loaded under on the servers "
        "(requests ask for it; weight syncs replace it).",
    )

    @model_validator(mode="after")
    def _urls_for_engine(self) -> RolloutTarget:
        if self.engine == IN_TRAINER and self.urls:
            raise ValueError("rollout.urls: engine `trainer` generates in the trainer; no servers")
        if self.engine != IN_TRAINER and not self.urls:
            raise ValueError(f"rollout.urls: engine `{self.engine}` needs its servers' URLs")
        return self


class JudgeRequestOptions(ApiModel):
    """How a stage calls the judge server (OpenAI-compatible HTTP)."""

    concurrency: int = Field(default=16, gt=0, description="Judge requests in flight.")
    timeout_seconds: float = Field(default=60.0, gt=0, description="Timeout of one request.")
    max_retries: int = Field(
        default=2, ge=0, description="Retries of a request after a timeout, connection error, "
        "429 or 5xx; a verdict that still fails drops its pair (counted, never fatal)."
    )


class JudgeReward(JudgeRequestOptions):
    """Online rewards from the AI judge (ppo, grpo)."""

    mode: Literal["pairwise", "pointwise"] = Field(
        default="pairwise",
        description="pairwise: P(response beats a reference response) in [0, 1], the reference "
        "being the dataset's `answer`/`chosen` or else the judge's own answer; pointwise: the "
        "expected 0-9 score of the response, divided by 9.",
    )


# Default judge prompts. Fields: {prompt}, {a}, {b}, {response}, {principle}.
_PAIR_FIELDS = frozenset({"a", "b", "prompt", "principle"})
TEMPLATE_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # template: (required fields, allowed fields)
    "reference": (frozenset({"prompt"}), frozenset({"prompt"})),
    "compare": (frozenset({"a", "b"}), _PAIR_FIELDS),
    "compare_direct": (frozenset({"a", "b", "prompt"}), _PAIR_FIELDS),
    "verdict": (frozenset(), frozenset({"principle"})),
    "score": (frozenset({"response"}), frozenset({"prompt", "response", "principle"})),
}


class JudgeTemplates(ApiModel):
    """The judge's prompts, as Python format strings; each is one user turn of a chat."""

    reference: str = Field(default="{prompt}", description="Turn 1: the judge answers itself.")
    compare: str = Field(
        default="Here are two responses to the same request.\n\nA: {a}\n\nB: {b}\n\n"
        "Compare each of them with your own answer above, then critique both against this "
        "principle: {principle}",
        description="Turn 2 with self-reference: the pair and the principle; asks for a critique.",
    )
    compare_direct: str = Field(
        default="Request: {prompt}\n\nHere are two responses to it.\n\nA: {a}\n\nB: {b}"
        "\n\nCritique both against this principle: {principle}",
        description="The comparison without self-reference (the baseline protocol).",
    )
    verdict: str = Field(
        default="{principle} Answer with one letter, A or B.",
        description="The last turn; its answer is constrained to A or B.",
    )
    score: str = Field(
        default="Request: {prompt}\n\nResponse: {response}\n\nRate the response against "
        "this principle: {principle} Answer with one digit from 0 (worst) to 9 (best).",
        description="Pointwise rewards; the answer is constrained to one digit.",
    )

    @model_validator(mode="after")
    def _fields(self) -> JudgeTemplates:
        for name, (required, allowed) in TEMPLATE_FIELDS.items():
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(getattr(self, name)) if f}
            except ValueError as err:
                raise ValueError(f"templates.{to_camel(name)}: {err}; write literal braces "
                                 "as {{ and }}") from None
            if used - allowed or required - used:
                raise ValueError(
                    f"templates.{to_camel(name)}: uses {sorted(used)}; it needs "
                    f"{sorted(required)} and may use {sorted(allowed)}"
                )
        return self


class JudgeProtocol(ApiModel):
    """How the AI judge compares responses (Bao et al. 2024, self-reference)."""

    principle: str = Field(
        default="Which response is best for humanity?",
        max_length=2000,
        description="The one general principle the judge applies.",
    )
    self_reference: bool = Field(
        default=True, description="The judge answers the prompt first and uses it as reference."
    )
    critique: bool = Field(
        default=True, description="The judge critiques both responses before its verdict."
    )
    # Not `Temperature` (> 0): a judge may decode greedily, at 0.
    temperature: float = Field(default=0.1, ge=0, description="Sampling of answer and critique.")
    top_p: TopP = 0.9
    max_new_tokens: MaxNewTokens = Field(
        default=512, description="Length of the judge's own answer and of its critique."
    )
    templates: JudgeTemplates = Field(default_factory=JudgeTemplates)
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template for the judge's prompts; default: the judge model's "
        "own, or a plain Human/Assistant transcript when it has none.",
    )


class JudgeTarget(JudgeProtocol):
    """The judge servers and protocol, as rendered for a trainer by the operator."""

    engine: Literal["vllm", "lmdeploy"] = "vllm"
    urls: list[str] = Field(min_length=1, description="Base URL of each judge server replica.")
    served_model: str = Field(description="The model name the servers answer to.")
    model: ModelSource = Field(description="The judge's weights (read for its chat template).")
    requests: JudgeRequestOptions = Field(default_factory=JudgeRequestOptions)
    startup_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="How long the trainer waits for the servers."
    )
    mode: Literal["pairwise", "pointwise"] | None = Field(
        default=None, description="ppo, grpo: how the judge rewards responses."
    )


class EpisodeOptions(ApiModel):
    """How an online stage plays multi-turn episodes against an environment server (HTTP +
    JSON: `GET /health`, `POST /reset`, `POST /step`; docs/ENVIRONMENTS.md)."""

    max_turns: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Assistant turns after which an episode ends if the environment has not "
        "said `done`.",
    )
    timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Timeout of one /reset or /step request; a late reply drops the episode.",
    )
    concurrency: int = Field(
        default=16, ge=1, le=1024, description="Environment requests in flight."
    )
    startup_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        le=86400,
        description="How long the trainer waits for the environment's /health before failing.",
    )


class EnvironmentTarget(EpisodeOptions):
    """The environment servers of a stage, as rendered for the trainer by the operator."""

    urls: list[str] = Field(
        min_length=1, description="Base URL of each environment replica (an episode stays on one)."
    )
