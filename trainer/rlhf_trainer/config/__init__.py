"""Typed, torch-free configuration shared by the operator and the trainers.

The operator imports this package (and nothing else of `rlhf_trainer`): the pieces of the
`RLHFRun` spec that a trainer needs (model source, dataset, hyperparameters, per-algorithm
options) are defined once here, and the operator renders a `StageConfig` per stage into a
ConfigMap that the trainer reads back with `load_stage_config`.

Field names are camelCase on the wire (the Kubernetes convention) and snake_case in Python.
Every model forbids unknown fields, so a typo is an error that names the field.
"""

from __future__ import annotations

import os
import re
import string
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from rlhf_trainer.config.stages import STAGES as STAGES
from rlhf_trainer.config.stages import StageKind as StageKind
from rlhf_trainer.config.stages import option_blocks as option_blocks
from rlhf_trainer.config.stages import stage_types as stage_types

# The keys of STAGES, the stage table (config/stages.py), in its order (a test keeps them equal).
StageType = Literal["sft", "reward", "dpo", "rrhf", "ppo", "grpo", "feedback", "evaluate"]
STAGE_TYPES: tuple[str, ...] = typing.get_args(StageType)

DatasetFormat = Literal["jsonl", "hh", "preference", "ranked", "prompts", "shp", "tldr", "chat"]
DATASET_FORMATS: tuple[str, ...] = typing.get_args(DatasetFormat)
# The formats each reader of data.py takes (load_sft_rows, load_preference_rows,
# load_ranked_rows, load_prompt_rows); the operator refuses a stage its reader would refuse.
PAIR_FORMATS: tuple[str, ...] = ("hh", "preference", "shp", "tldr", "chat")
READER_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("jsonl", *PAIR_FORMATS),
    "preference": (*PAIR_FORMATS, "ranked"),
    "ranked": ("ranked", *PAIR_FORMATS),
    "prompts": DATASET_FORMATS,
}
# The fields of each format that `dataset.fields` may map to columns.
KNOWN_FIELDS: dict[str, tuple[str, ...]] = {
    "jsonl": ("prompt", "response"),
    "hh": ("chosen", "rejected"),
    "preference": ("prompt", "chosen", "rejected", "margin"),
    "ranked": ("prompt", "responses", "rewards"),
    "prompts": ("prompt", "answer"),
    "shp": ("history", "human_ref_A", "human_ref_B", "labels"),
    "tldr": ("info", "summaries", "choice"),
    "chat": ("messages", "prompt", "completion", "chosen", "rejected", "responses", "rewards",
             "answer", "margin"),
}
# The keys of tasks.REWARD_FUNCTIONS (a test keeps them equal), which imports models' code.
REWARD_FUNCTION_NAMES: tuple[str, ...] = ("animal_sounds", "brief")

# Upper bounds on sizes: far above any published RLHF setting (global batches of a few thousand
# sequences, 128 completions a prompt, 128k-token contexts), low enough that a typo such as
# batchSize 1e12 is refused here instead of allocating gigabytes before step 1.
MAX_BATCH = 2**20  # examples (or samples) per optimizer step, prompts per rollout step
MAX_TOKENS = 2**20  # hyperparameters.maxLength
MAX_NEW_TOKENS = 2**17  # tokens generated per response
MAX_PER_PROMPT = 2**10  # completions sampled per prompt

# Environment variable that tells a trainer where the workspace volume is mounted. Relative
# paths in a StageConfig (model.path, dataset.path, outputDir) are resolved against it.
WORKSPACE_ENV = "RLHF_WORKSPACE"
DEFAULT_WORKSPACE = "/workspace"

DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)]


class ApiModel(BaseModel):
    """Base for every spec model: camelCase aliases, unknown fields refused, numbers finite
    (status models that carry measured values read a non-finite one as None)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


FIELD_ERROR = "field"


def field_error(field: str, message: str) -> PydanticCustomError:
    """What a model validator raises about one of its fields (camelCase, dotted below it):
    `validation_problems` puts `field` on the error's path."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": field, "message": message})


class SecretKeyRef(ApiModel):
    """A key in a Kubernetes Secret in the run's namespace. Secrets never appear as values."""

    name: str = Field(description="Name of the Secret.")
    key: str = Field(description="Key inside the Secret.")


class ModelSource(ApiModel):
    """Where weights come from: a hub id (`name`, optional `revision`) or a `path`."""

    name: str | None = Field(
        default=None, description="Hugging Face hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct."
    )
    path: str | None = Field(
        default=None,
        description="Folder in Hugging Face format. Relative paths are relative to the workspace.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding a hub token, exposed to the trainer as HF_TOKEN."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.name is None) == (self.path is None):
            raise ValueError("set exactly one of `name` (a hub id) or `path` (a folder)")
        if self.revision is not None and self.path is not None:
            raise ValueError("`revision` applies to a hub `name`, not to a `path`")
        return self


class DatasetSpec(ApiModel):
    """A dataset: a hub dataset `name` or a local JSONL `path`, in one of the known formats."""

    name: str | None = Field(default=None, description="Hub dataset id, e.g. Anthropic/hh-rlhf.")
    path: str | None = Field(
        default=None,
        description="JSONL file. Relative paths are relative to the workspace.",
    )
    format: DatasetFormat = Field(
        default="jsonl",
        description=(
            "jsonl: {prompt, response} rows; hh: HH-RLHF {chosen, rejected} transcripts; "
            "preference: {prompt, chosen, rejected, margin?}; ranked: {prompt, responses, "
            "rewards} (rewards may be left out when a reward model scores them); prompts: "
            "{prompt, answer?}; shp: Stanford SHP {history, human_ref_A, human_ref_B, labels}; "
            "tldr: OpenAI TL;DR comparisons {info: {post, title?, subreddit?}, summaries: "
            "[{text}, {text}], choice}; chat: TRL's conversational rows of {role, content} "
            "messages ({messages} or {prompt, completion} for sft; {prompt, chosen, rejected} "
            "or whole chosen/rejected conversations for pairs; {prompt, responses, rewards?}; "
            "{prompt, answer?} for prompts), rendered with the model's chat template."
        ),
    )
    apply_chat_template: bool = Field(
        default=True,
        description=(
            "Render hh, shp and tldr rows as chat turns with the model's chat template when "
            "it has one (as chat rows always are); false keeps their raw text."
        ),
    )
    fields: dict[str, str] | None = Field(
        default=None,
        description=(
            "Column names for the format's fields when the data names them differently: "
            "format field -> column, e.g. {prompt: question, chosen: good, rejected: bad}."
        ),
    )
    skip_invalid: bool = Field(
        default=False,
        description=(
            "Skip rows that fail validation (and count them in the log) instead of failing "
            "the stage on the first one."
        ),
    )
    eval_split: str | None = Field(
        default=None,
        description="Hub split held out for evaluation (e.g. test); only with `name`.",
    )
    eval_path: str | None = Field(
        default=None,
        description="JSONL file (same format) held out for evaluation; only with `path`.",
    )
    split: str = Field(default="train", description="Split to read from a hub dataset.")
    revision: str | None = Field(default=None, description="Hub dataset revision.")
    eval_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Share of rows held out for evaluation (taken from the end of the file).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.name is None) == (self.path is None):
            raise ValueError("set exactly one of `name` (a hub dataset) or `path` (a JSONL file)")
        if self.eval_split is not None and self.name is None:
            raise ValueError("`evalSplit` names a hub split; with a local `path` use `evalPath`")
        if self.eval_path is not None and self.path is None:
            raise ValueError("`evalPath` goes with a local `path`; with a hub `name` use evalSplit")
        if self.eval_fraction > 0 and (self.eval_split or self.eval_path):
            raise ValueError("set one of `evalFraction` or an explicit `evalSplit`/`evalPath`")
        return self

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str] | None, info: ValidationInfo) -> Any:
        fmt = info.data.get("format", "jsonl")
        unknown = sorted(set(value or {}) - set(KNOWN_FIELDS[fmt]))
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} is not a field of format {fmt!r}; map some of "
                f"{', '.join(KNOWN_FIELDS[fmt])} to your column names"
            )
        return value

    def held_out(self) -> DatasetSpec | None:
        """The explicit evaluation split as a dataset of its own, or None."""
        if self.eval_split is not None:
            return self.model_copy(update={"split": self.eval_split, "eval_split": None})
        if self.eval_path is not None:
            return self.model_copy(update={"path": self.eval_path, "eval_path": None})
        return None


class Hyperparameters(ApiModel):
    """Optimisation settings common to every trainer stage."""

    max_steps: int | None = Field(
        default=None, gt=0, description="Optimizer steps; when unset, `epochs` decides."
    )
    epochs: float = Field(default=1.0, gt=0, description="Passes over the dataset.")
    learning_rate: float = Field(default=1e-5, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(
        default=8,
        gt=0,
        le=MAX_BATCH,
        description=(
            "Global batch: examples per optimizer step over all ranks. Each rank takes "
            "batchSize / (worldSize * gradientAccumulation) per micro-step, so it must divide "
            "by trainer.nodes x processes per node x gradientAccumulation. At most 2^20: far "
            "above published RLHF batches, so a typo fails validation, not the trainer."
        ),
    )
    gradient_accumulation: int = Field(
        default=1, gt=0, le=MAX_BATCH, description="Micro-steps per step."
    )
    max_length: int = Field(
        default=512,
        gt=0,
        le=MAX_TOKENS,
        description="Truncate sequences to this length (at most 2^20 tokens).",
    )
    seed: int = Field(default=42, ge=0, description="Seed for data order, init and sampling.")
    shuffle: bool = Field(
        default=True,
        description="Shuffle the rows every epoch; false keeps the file's order, e.g. so that "
        "rows meant to be learned together (a judge's pair in both orders) share a batch.",
    )
    save_every: int = Field(default=50, gt=0, description="Write a checkpoint every N steps.")
    keep_checkpoints: int = Field(default=2, gt=0, description="Checkpoints kept on disk.")
    log_every: int = Field(default=1, gt=0, description="Write progress and metrics every N steps.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        default="cosine", description="Decay after warmup."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(default=1.0, ge=0, description="Global grad-norm clip; 0 disables.")
    bf16: bool | None = Field(
        default=None, description="Train in bf16; by default on when a GPU is present."
    )


class LoRAOptions(ApiModel):
    """Train low-rank adapters (PEFT LoRA) instead of every weight; on sft, reward, dpo, rrhf,
    and on the policy of ppo and grpo (whose rollout servers then load only the adapters)."""

    r: int = Field(default=8, gt=0, le=1024, description="Rank of the adapters.")
    alpha: int = Field(default=16, gt=0, description="Scale: updates are alpha / r * BA.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        default=None,
        description="Module names to adapt, e.g. [q_proj, v_proj]; default: every linear "
        "layer except the output head (PEFT's all-linear).",
    )
    merge: bool = Field(
        default=True,
        description="Write the merged full model to final/ (what any later stage can start "
        "from); false writes only the adapter (adapter_config.json and weights), which "
        "later stages of this project also load, on top of its base model.",
    )


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
    samples_per_prompt: int = Field(
        default=4, ge=2, le=MAX_PER_PROMPT, description="k responses per query (online only)."
    )
    rollout_batch_size: int = Field(
        default=16, gt=0, le=MAX_BATCH, description="Queries sampled per step (online only)."
    )
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature (online).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Sampling top-p (online).")
    max_new_tokens: int = Field(
        default=64, gt=0, le=MAX_NEW_TOKENS, description="Response length (online)."
    )
    async_: bool = Field(
        default=False,
        alias="async",
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
    rollout_batch_size: int = Field(default=128, gt=0, le=MAX_BATCH)
    ppo_epochs: int = Field(default=1, gt=0)
    temperature: float = Field(default=0.8, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=64, gt=0, le=MAX_NEW_TOKENS)
    ptx_dataset: DatasetSpec | None = Field(
        default=None,
        description="Supervised data (jsonl, hh, preference) for the ptx LM loss; needed when "
        "ptxCoef > 0.",
    )
    async_: bool = Field(
        default=False,
        alias="async",
        description="Generate step t+1 while step t trains (one step off-policy; the "
        "importance ratio uses the rollout servers' behaviour logprobs).",
    )

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

    num_generations: int = Field(
        default=8, ge=2, le=MAX_PER_PROMPT, description="Completions per prompt (G)."
    )
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
    rollout_batch_size: int = Field(
        default=64, gt=0, le=MAX_BATCH, description="Prompts per step."
    )
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=64, gt=0, le=MAX_NEW_TOKENS)
    async_: bool = Field(
        default=False,
        alias="async",
        description="Generate step t+1 while step t trains (one step off-policy; the "
        "importance ratio uses the rollout servers' behaviour logprobs).",
    )

    @model_validator(mode="after")
    def _buffer_fits(self) -> typing.Self:
        penalty = self.overlong_penalty
        if penalty is not None and penalty.buffer >= self.max_new_tokens:
            raise ValueError(
                f"overlongPenalty.buffer ({penalty.buffer}) must be smaller than maxNewTokens "
                f"({self.max_new_tokens}): the penalty starts at maxNewTokens - buffer tokens"
            )
        return self


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


class FeedbackOptions(JudgeRequestOptions):
    """Options of the `feedback` (AI feedback) stage."""

    responses_per_prompt: int = Field(
        default=2,
        ge=2,
        le=MAX_PER_PROMPT,
        description="Responses per prompt: sampled from the policy for a prompts-only dataset, "
        "the first k of a ranked row. Every pair of them is judged.",
    )
    position_swap: bool = Field(default=True, description="Judge both orders; keep agreeing pairs.")
    max_prompts: int | None = Field(default=None, gt=0, description="Judge at most N prompts.")
    temperature: float = Field(default=1.0, gt=0, description="Policy sampling temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Policy sampling top-p.")
    max_new_tokens: int = Field(
        default=64, gt=0, le=MAX_NEW_TOKENS, description="Policy response length."
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
    temperature: float = Field(default=0.1, ge=0, description="Sampling of answer and critique.")
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(
        default=512,
        gt=0,
        le=MAX_NEW_TOKENS,
        description="Length of the judge's own answer and of its critique.",
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
    max_new_tokens: int = Field(
        default=64, gt=0, le=MAX_NEW_TOKENS, description="Greedy tokens per response."
    )
    batch_size: int = Field(
        default=16, gt=0, le=MAX_BATCH, description="Prompts per generation batch."
    )


class StageConfig(ApiModel):
    """What one trainer process needs: the rendered, self-contained config of a stage.

    Relative paths are resolved against the workspace (`$RLHF_WORKSPACE`, `/workspace` in a pod).
    """

    run: str = Field(description="Name of the RLHFRun.")
    stage: str = Field(description="Name of the stage.")
    type: StageType
    model: ModelSource = Field(description="Initial weights (the base model or a `from` output).")
    dataset: DatasetSpec | None = None
    output_dir: str = Field(description="Folder for final/, checkpoints/, progress.json, metrics.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    sft: SFTOptions | None = None
    reward_model: RewardModelOptions | None = None
    dpo: DPOOptions | None = None
    rrhf: RRHFOptions | None = None
    ppo: PPOOptions | None = None
    grpo: GRPOOptions | None = None
    feedback: FeedbackOptions | None = None
    evaluate: EvaluateOptions | None = None
    lora: LoRAOptions | None = None
    reward_model_path: str | None = Field(
        default=None,
        description="Reward model that scores responses: the final/ folder of the stage named "
        "by `reward.from`, filled in by the operator.",
    )
    reward_function: str | None = Field(
        default=None, description="Registered reward function (`reward.function`)."
    )
    rollout: RolloutTarget | None = Field(
        default=None, description="ppo, grpo: the rollout servers, filled in by the operator."
    )
    judge: JudgeTarget | None = Field(
        default=None,
        description="feedback, and reward: {judge}: the judge servers, filled in by the operator.",
    )
    environment: EnvironmentTarget | None = Field(
        default=None,
        description="grpo: the environment servers its episodes run against, filled in by the "
        "operator.",
    )
    policies: dict[str, str] | None = Field(
        default=None,
        description="evaluate: policy name -> model folder, from `evaluate.policies`.",
    )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the field and the fix."""


_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_loc(loc: tuple[int | str, ...]) -> str:
    """`("spec", "stages", 1, "from")` -> `spec.stages[1].from`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _SIMPLE_KEY.fullmatch(part):
            out += f"[{part!r}]"  # a key a user mistyped can hold any character
        else:
            out += f".{part}" if out else part
    return out or "(root)"


_HINTS = {
    "extra_forbidden": "unknown field; check its spelling against the API reference",
    "missing": "required field is missing",
}


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem (see `validation_problems`)."""
    return "\n".join(validation_problems(err, source))


def validation_problems(err: ValidationError, source: str) -> list[str]:
    """One entry per problem: `source: field.path: message`.

    Validators that check several fields at once put the field path at the start of their
    message (`stages[1].from: ...`); it is joined onto the location here.
    """
    lines = []
    for item in err.errors():
        loc = format_loc(tuple(item["loc"]))
        msg = _HINTS.get(item["type"], item["msg"]).removeprefix("Value error, ")
        if item["type"] == FIELD_ERROR:
            loc = f"{loc}.{item['ctx']['field']}"
        head, sep, rest = msg.partition(": ")
        if sep and head.startswith("stages[") and " " not in head:
            loc, msg = f"{loc}.{head}", rest
        lines.append(f"{source}: {loc}: {msg}")
    return lines


def load_stage_config(path: str | os.PathLike[str]) -> StageConfig:
    """Read and validate a rendered stage config; raise ConfigError naming the problem."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{source}: cannot read the config file: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields at the top level")
    try:
        return StageConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from err


def workspace_root() -> Path:
    """The workspace folder: `$RLHF_WORKSPACE`, or /workspace as mounted in a pod."""
    return Path(os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE))


def resolve_path(path: str) -> Path:
    """Resolve a spec path: absolute paths stay, relative ones hang off the workspace."""
    p = Path(path)
    return p if p.is_absolute() else workspace_root() / p


# -- bf16 on CPU (docs/DESIGN.md, "bf16 on CPU") ------------------------------------------------
# Here rather than in either package because both sides of a local run decide: the trainer its
# own precision, the local executor its vLLM servers' dtype. The same function on the same facts
# keeps the parity probe comparing like with like.

CPU_BF16_ENV = "RLHF_CPU_BF16"
CPU_BF16_FORCE = "force"
# Flags of bf16 arithmetic in hardware: x86 (Cooper Lake, Sapphire Rapids, Zen 4 and later) and
# aarch64 (Armv8.6 `bf16`). Without one torch emulates bf16 matmuls, 10-100x slower than float32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


class CpuBf16(typing.NamedTuple):
    """What is known of a CPU's bf16: `native` is None when nothing says either way."""

    native: bool | None
    evidence: str


class Bf16Choice(typing.NamedTuple):
    """The precision a trainer computes in; `fallback` says why a requested bf16 is off."""

    bf16: bool
    fallback: str | None = None


def read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    """The text of /proc/cpuinfo, or "" where there is none (macOS, Windows)."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_bf16_from_cpuinfo(text: str) -> CpuBf16:
    """Read the first `flags` (x86) or `Features` (aarch64) line of /proc/cpuinfo."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in ("flags", "Features"):
            continue
        flags = set(value.split())
        found = sorted(NATIVE_BF16_FLAGS & flags)
        if found:
            return CpuBf16(True, f"{' and '.join(found)} in /proc/cpuinfo")
        if key.strip() == "Features":
            return CpuBf16(False, "aarch64 without the bf16 feature in /proc/cpuinfo")
        level = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "pre-AVX2"
        return CpuBf16(False, f"{level} only: no avx512_bf16 or amx_bf16 flag in /proc/cpuinfo")
    return CpuBf16(None, "no CPU flags in /proc/cpuinfo")


def cpu_bf16_kept(cpu: CpuBf16, override: str | None) -> bool:
    """Whether bf16 stays on for this CPU: unless it is known to lack native bf16 and
    `RLHF_CPU_BF16` is not `force`. Unknown CPUs keep what was asked for."""
    return cpu.native is not False or (override or "").strip().lower() == CPU_BF16_FORCE


def cpu_bf16_fallback_message(
    cpu: CpuBf16, setting: str = "hyperparameters.bf16: true", quiet: str = "bf16: false"
) -> str:
    """Why `setting` became float32 here, and the two ways out."""
    return (
        f"{setting} fell back to float32: this CPU has no native bf16 ({cpu.evidence}), where "
        f"bf16 matmuls run 10-100x slower than float32; set {CPU_BF16_ENV}={CPU_BF16_FORCE} to "
        f"keep bf16 anyway, or {quiet} to silence this"
    )


def resolve_bf16(
    requested: bool | None, gpu: bool, cpu: CpuBf16, override: str | None
) -> Bf16Choice:
    """Training precision from `hyperparameters.bf16` (unset: bf16 with a GPU, float32 without),
    the device, this CPU's bf16 facts and `$RLHF_CPU_BF16`. GPUs get what was asked for."""
    if requested is None:
        return Bf16Choice(gpu)
    if not requested or gpu or cpu_bf16_kept(cpu, override):
        return Bf16Choice(requested)
    return Bf16Choice(False, cpu_bf16_fallback_message(cpu))
