"""The options block of each stage type, in the order of the stage table (config/stages.py):
a new stage type's options class goes here, and its field in `StageConfig` (config/stage.py)."""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from rlhf_trainer.config.common import ApiModel, DatasetSpec, field_error
from rlhf_trainer.config.sampling import (
    AsyncRollout,
    MaxNewTokens,
    RolloutBatchSize,
    SamplesPerPrompt,
    Temperature,
    TopP,
)
from rlhf_trainer.config.targets import JudgeRequestOptions


class SFTOptions(ApiModel):
    """Options of the `sft` stage."""

    packing: bool = Field(
        default=False,
        description="Pack several examples into one sequence: not implemented yet, so only "
        "false is accepted.",
    )

    @field_validator("packing")
    @classmethod
    def _no_packing(cls, value: bool) -> bool:
        if value:
            raise ValueError("packing is not implemented yet; set it to false or leave it out")
        return value


class RewardModelOptions(ApiModel):
    """Options of the `reward` stage (Bradley–Terry)."""

    lm_loss_weight: float = Field(
        default=0.0,
        ge=0,
        description="Weight of an LM loss on the chosen response (MOSS-RLHF; 1.0 in the "
        "self-reference work). Needs a model with an LM head to start from.",
    )
    use_margin: bool = Field(
        default=True,
        description="Use the per-pair margin in the data (a `margin` column, or the reward gap "
        "of ranked data).",
    )


class DPOOptions(ApiModel):
    """Options of the `dpo` stage."""

    beta: float = Field(default=0.1, gt=0, description="Scale of the implicit reward.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        default="sigmoid",
        description="sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar et al. 2023), on "
        "per-token mean log-ratios as in TRL; hinge: SLiC-style max(0, 1 - beta * margin).",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Conservative DPO: the share of labels assumed flipped (sigmoid loss only).",
    )
    precompute_ref_logprobs: bool = Field(
        default=False,
        description="Score every example with the reference model once before training and "
        "free it, instead of a reference forward per step.",
    )
    sft_weight: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="RPO (Pang et al. 2024): add sftWeight x the chosen response's NLL per token "
        "to the DPO loss; holds the chosen likelihood up (TRL: loss_type [sigmoid, sft]).",
    )


class RRHFOptions(ApiModel):
    """Options of the `rrhf` stage."""

    rrhf_weight: float = Field(default=1.0, ge=0, description="Weight of the ranking loss.")
    length_penalty: float = Field(default=1.0, ge=0, description="Exponent of |y| in the score.")
    online: bool = Field(
        default=False,
        description="Sample the k responses per query from the current policy through the "
        "rollout servers and score them with `reward` (the dataset then holds prompts); off: "
        "read them, with their rewards or scored by `reward`, from a ranked dataset.",
    )
    samples_per_prompt: SamplesPerPrompt = Field(
        default=4, description="k responses per query (online only)."
    )
    rollout_batch_size: RolloutBatchSize = Field(
        default=16, description="Queries sampled per step (online only)."
    )
    temperature: Temperature = Field(default=1.0, description="Sampling temperature (online).")
    top_p: TopP = Field(default=1.0, description="Sampling top-p (online).")
    max_new_tokens: MaxNewTokens = Field(default=64, description="Response length (online).")
    async_: AsyncRollout = Field(
        default=False,
        description="Online: generate step t+1 while step t trains (its responses then come "
        "from the policy one step back; RRHF takes no importance ratio, so nothing corrects it).",
    )


RolloutCorrection = Literal["auto", "tis", "none"]
LogprobTemperature = Literal["one", "sampling"]


class PolicyGradientOptions(ApiModel):
    """What PPO and GRPO share: how the ratio's π_old and π are read."""

    rollout_correction: RolloutCorrection = Field(
        default="auto",
        description="tis: weight each token's loss by min(pi_old / pi_rollout, cap), pi_old from "
        "a trainer forward pass (truncated importance sampling, Yao et al. 2025); auto: tis "
        "with async: true, else none.",
    )
    rollout_correction_cap: float = Field(
        default=2.0, gt=0, allow_inf_nan=False, description="C of the truncated IS weight."
    )
    logprob_temperature: LogprobTemperature = Field(
        default="one",
        description="one: logprobs of the model's own distribution (MOSS-RLHF; what vLLM "
        "returns); sampling: logits divided by the sampling temperature first (TRL, OpenRLHF, "
        "verl), pi_old then always from a forward pass; not with async: true.",
    )

    @model_validator(mode="after")
    def _temperature_needs_sync(self) -> typing.Self:
        if self.logprob_temperature == "sampling" and getattr(self, "async_", False):
            raise ValueError(
                "logprobTemperature: sampling needs the behaviour logprobs at the sampling "
                "temperature, which the rollout servers do not return; use async: false or "
                "logprobTemperature: one"
            )
        return self


PPO_MAX_PRESET: dict[str, Any] = {
    "reward_scaling": False,
    "reward_normalization": True,
    "reward_clip": 10.0,
    "advantage_whitening": False,
    "value_clip": 0.2,
    "critic_warmup_steps": 50,
}


class PPOOptions(PolicyGradientOptions):
    """PPO with the PPO-max switches (Zheng et al. 2023; defaults from MOSS-RLHF)."""

    reward_scaling: bool = Field(default=True)
    reward_normalization: bool = Field(default=False)
    reward_clip: float | None = Field(default=None, gt=0, description="Clip scaled rewards to ±δ.")
    kl_coef: float = Field(
        default=0.02, ge=0, description="β of the per-token KL penalty (klEstimator)."
    )
    kl_controller: Literal["fixed", "adaptive"] = Field(default="fixed")
    kl_target: float | None = Field(default=None, gt=0, description="Target KL (adaptive).")
    kl_horizon: int = Field(default=10000, gt=0, description="Horizon of the adaptive controller.")
    advantage_whitening: bool = Field(
        default=True,
        description="Whiten advantages over the batch (all ranks), as TRL and OpenRLHF do; on "
        "here, it learned more than off (docs/ALGORITHMS.md). MOSS-RLHF's released scripts do "
        "not whiten, and `preset: ppo-max` turns it off.",
    )
    value_clip: float | None = Field(default=0.2, gt=0)
    policy_clip: float = Field(default=0.2, gt=0)
    policy_clip_high: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="ε_high: clip the ratio to [1 - policyClip, 1 + policyClipHigh] (DAPO's "
        "clip-higher); unset: policyClip.",
    )
    dual_clip: float | None = Field(
        default=None,
        gt=1,
        allow_inf_nan=False,
        description="c of dual-clip PPO (Ye et al. 2020): a negative-advantage token's loss is "
        "at most -c·A (verl uses 3).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        default="k1",
        description="Per-token KL in the reward penalty, d = log pi - log pi_ref: k1 = d, "
        "k2 = d²/2, k3 = exp(-d) - 1 + d (Schulman 2020).",
    )
    preset: Literal["none", "ppo-max"] = Field(
        default="none",
        description="ppo-max: the paper's PPO-max (Zheng et al. 2023, section 5.4): reward "
        "normalisation and clipping to ±10, no reward scaling, no advantage whitening, value "
        "clip 0.2, 50 critic warm-up steps; fields set in the spec win.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") != "ppo-max":
            return data
        given = {to_camel(k) for k in data} | set(data)
        unset = {k: v for k, v in PPO_MAX_PRESET.items() if to_camel(k) not in given}
        return {**data, **unset}
    entropy_coef: float = Field(default=0.0, ge=0)
    ptx_coef: float = Field(default=0.0, ge=0)
    critic_warmup_steps: int = Field(default=0, ge=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    critic_learning_rate: float = Field(default=1.5e-6, gt=0)
    rollout_batch_size: RolloutBatchSize = 128
    ppo_epochs: int = Field(default=1, gt=0)
    temperature: Temperature = 0.8
    top_p: TopP = 0.9
    max_new_tokens: MaxNewTokens = 64
    ptx_dataset: DatasetSpec | None = Field(
        default=None,
        description="Supervised data (jsonl, hh, preference) for the ptx LM loss; needed when "
        "ptxCoef > 0.",
    )
    async_: AsyncRollout = False

    @model_validator(mode="after")
    def _needs(self) -> typing.Self:
        if self.ptx_coef > 0 and self.ptx_dataset is None:
            raise field_error("ptxDataset", "ptxCoef > 0 mixes in an LM loss on supervised "
                              "data; set ptxDataset, or ptxCoef to 0")  # fmt: skip
        if self.kl_controller == "adaptive" and self.kl_target is None:
            raise field_error("klTarget", "the adaptive KL controller needs a target KL; set "
                              "klTarget, or klController to fixed")  # fmt: skip
        return self


class OverlongPenalty(ApiModel):
    """DAPO's soft overlong punishment (Yu et al. 2025), with L_max = maxNewTokens."""

    buffer: int = Field(
        gt=0,
        description="L_buf: a response longer than L_max - L_buf tokens loses "
        "factor x (|y| - (L_max - L_buf)) / L_buf of reward; one of L_max or more, factor.",
    )
    factor: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="Largest penalty.")


class GRPOOptions(PolicyGradientOptions):
    """Options of the critic-free `grpo` stage."""

    num_generations: SamplesPerPrompt = Field(default=8, description="Completions per prompt (G).")
    scale_rewards: Literal["group", "batch", "none"] = Field(default="group")
    clip: float = Field(default=0.2, gt=0)
    clip_high: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="ε_high: clip the ratio to [1 - clip, 1 + clipHigh] (DAPO's clip-higher, "
        "0.28 there); unset: clip.",
    )
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        Field(
            default="token-mean",
            description="token-mean: sum over the batch's tokens / their count (DAPO); "
            "seq-mean-token-mean: mean of each sequence's token mean (DeepSeekMath); "
            "seq-mean-token-sum-norm: sum / (sequences x maxNewTokens) (Dr.GRPO).",
        )
    )
    advantage_estimator: Literal["grpo", "rloo", "reinforce++"] = Field(
        default="grpo",
        description="grpo: (r - group mean) scaled by scaleRewards; rloo: r - mean of the other "
        "completions of the prompt (Ahmadian et al. 2024); reinforce++: the return with a "
        "per-token k1 KL penalty (klCoef) whitened over the batch (Hu 2025).",
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="DAPO's dynamic sampling: drop groups whose rewards are all equal and "
        "sample more prompts until the step has rolloutBatchSize groups (bounded).",
    )
    dynamic_sampling_rounds: int = Field(
        default=3, gt=0, le=100, description="Extra sampling rounds a step may take to refill."
    )
    overlong_penalty: OverlongPenalty | None = Field(
        default=None, description="DAPO's soft penalty for responses near maxNewTokens."
    )
    kl_coef: float = Field(default=0.0, ge=0, description="β; 0 loads no reference model.")
    rollout_batch_size: RolloutBatchSize = Field(default=64, description="Prompts per step.")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    max_new_tokens: MaxNewTokens = 64
    async_: AsyncRollout = False

    @model_validator(mode="after")
    def _buffer_fits(self) -> typing.Self:
        penalty = self.overlong_penalty
        if penalty is not None and penalty.buffer >= self.max_new_tokens:
            raise ValueError(
                f"overlongPenalty.buffer ({penalty.buffer}) must be smaller than maxNewTokens "
                f"({self.max_new_tokens}): the penalty starts at maxNewTokens - buffer tokens"
            )
        return self


class FeedbackOptions(JudgeRequestOptions):
    """Options of the `feedback` (AI feedback) stage."""

    responses_per_prompt: SamplesPerPrompt = Field(
        default=2,
        description="Responses per prompt: sampled from the policy for a prompts-only dataset, "
        "the first k of a ranked row. Every pair of them is judged.",
    )
    position_swap: bool = Field(default=True, description="Judge both orders; keep agreeing pairs.")
    max_prompts: int | None = Field(default=None, gt=0, description="Judge at most N prompts.")
    temperature: Temperature = Field(default=1.0, description="Policy sampling temperature.")
    top_p: TopP = Field(default=1.0, description="Policy sampling top-p.")
    max_new_tokens: MaxNewTokens = Field(default=64, description="Policy response length.")


class EvaluateOptions(ApiModel):
    """Options of the `evaluate` stage."""

    policies: list[str] = Field(
        default_factory=list,
        description="Stages whose policies to compare on the stage's prompts (`dataset`); the "
        "KL reference is the stage's own model (`from`, else spec.model).",
    )
    reference_dataset: DatasetSpec | None = Field(
        default=None, description="Supervised data (jsonl, hh, preference) for perplexity."
    )
    preference_dataset: DatasetSpec | None = Field(
        default=None,
        description="Held-out pairs on which to report the pairwise accuracy of the reward "
        "model (`reward.from`).",
    )
    max_new_tokens: MaxNewTokens = Field(default=64, description="Greedy tokens per response.")
    batch_size: RolloutBatchSize = Field(default=16, description="Prompts per generation batch.")


class OptionBlocks(ApiModel):
    """The per-algorithm option blocks, each for the one stage type the stage table gives it,
    declared once for the RLHFRun's stage (`rlhf_operator.api.Stage`) and for `StageConfig`.
    Those list it after their leading fields (`class X(OptionBlocks, Head)`: pydantic orders
    fields base first), so the CRD keeps its order."""

    sft: SFTOptions | None = None
    reward_model: RewardModelOptions | None = None
    dpo: DPOOptions | None = None
    rrhf: RRHFOptions | None = None
    ppo: PPOOptions | None = None
    grpo: GRPOOptions | None = None
    feedback: FeedbackOptions | None = None
    evaluate: EvaluateOptions | None = None
