"""Typed, torch-free configuration shared by the operator and the trainers.

The operator imports this module (and nothing else of `rlhf_trainer`): the pieces of the
`RLHFRun` spec that a trainer needs (model source, dataset, hyperparameters, per-algorithm
options) are defined once here, and the operator renders a `StageConfig` per stage into a
ConfigMap that the trainer reads back with `load_stage_config`.

Field names are camelCase on the wire (the Kubernetes convention) and snake_case in Python.
Every model forbids unknown fields, so a typo is an error that names the field.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

StageType = Literal["sft", "reward", "dpo", "rrhf", "ppo", "grpo", "feedback", "evaluate"]
STAGE_TYPES: tuple[str, ...] = typing.get_args(StageType)

DatasetFormat = Literal["jsonl", "hh", "preference", "ranked", "prompts"]

# Environment variable that tells a trainer where the workspace volume is mounted. Relative
# paths in a StageConfig (model.path, dataset.path, outputDir) are resolved against it.
WORKSPACE_ENV = "RLHF_WORKSPACE"
DEFAULT_WORKSPACE = "/workspace"

DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)]


class ApiModel(BaseModel):
    """Base for every spec model: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


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
            "rewards}; prompts: {prompt, answer?}."
        ),
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
        return self


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
        description=(
            "Global batch: examples per optimizer step over all ranks. Each rank takes "
            "batchSize / (worldSize * gradientAccumulation) per micro-step."
        ),
    )
    gradient_accumulation: int = Field(default=1, gt=0, description="Micro-steps per step.")
    max_length: int = Field(default=512, gt=0, description="Truncate sequences to this length.")
    seed: int = Field(default=42, ge=0, description="Seed for data order, init and sampling.")
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


class SFTOptions(ApiModel):
    """Options of the `sft` stage."""

    packing: bool = Field(default=False, description="Pack several examples into one sequence.")


class RewardModelOptions(ApiModel):
    """Options of the `reward` stage (Bradley–Terry)."""

    lm_loss_weight: float = Field(
        default=0.0, ge=0, description="Weight of an LM loss on the chosen response."
    )
    use_margin: bool = Field(default=True, description="Use the per-pair margin in the data.")


class DPOOptions(ApiModel):
    """Options of the `dpo` stage."""

    beta: float = Field(default=0.1, gt=0, description="Scale of the implicit reward.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(default="sigmoid")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Conservative DPO.")
    precompute_ref_logprobs: bool = Field(default=False)


class RRHFOptions(ApiModel):
    """Options of the `rrhf` stage."""

    rrhf_weight: float = Field(default=1.0, ge=0, description="Weight of the ranking loss.")
    length_penalty: float = Field(default=1.0, ge=0, description="Exponent of |y| in the score.")
    online: bool = Field(default=False, description="Sample responses from the rollout server.")
    samples_per_prompt: int = Field(default=4, ge=2, description="k responses per query.")


class PPOOptions(ApiModel):
    """PPO with the PPO-max switches (Zheng et al. 2023; defaults from MOSS-RLHF)."""

    reward_scaling: bool = Field(default=True)
    reward_normalization: bool = Field(default=False)
    reward_clip: float | None = Field(default=None, gt=0, description="Clip scaled rewards to ±δ.")
    kl_coef: float = Field(default=0.02, ge=0, description="β of the per-token k1 KL penalty.")
    kl_controller: Literal["fixed", "adaptive"] = Field(default="fixed")
    kl_target: float | None = Field(default=None, gt=0, description="Target KL (adaptive).")
    kl_horizon: int = Field(default=10000, gt=0, description="Horizon of the adaptive controller.")
    advantage_whitening: bool = Field(default=True)
    value_clip: float | None = Field(default=0.2, gt=0)
    policy_clip: float = Field(default=0.2, gt=0)
    entropy_coef: float = Field(default=0.0, ge=0)
    ptx_coef: float = Field(default=0.0, ge=0)
    critic_warmup_steps: int = Field(default=0, ge=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    critic_learning_rate: float = Field(default=1.5e-6, gt=0)
    rollout_batch_size: int = Field(default=128, gt=0)
    ppo_epochs: int = Field(default=1, gt=0)
    temperature: float = Field(default=0.8, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=64, gt=0)


class GRPOOptions(ApiModel):
    """Options of the critic-free `grpo` stage."""

    num_generations: int = Field(default=8, ge=2, description="Completions per prompt (G).")
    scale_rewards: Literal["group", "batch", "none"] = Field(default="group")
    clip: float = Field(default=0.2, gt=0)
    kl_coef: float = Field(default=0.0, ge=0, description="β; 0 loads no reference model.")
    rollout_batch_size: int = Field(default=64, gt=0, description="Prompts per step.")
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=64, gt=0)


class FeedbackOptions(ApiModel):
    """Options of the `feedback` (AI feedback) stage."""

    responses_per_prompt: int = Field(default=2, ge=2)
    position_swap: bool = Field(default=True, description="Judge both orders; keep agreeing pairs.")
    concurrency: int = Field(default=16, gt=0)
    timeout_seconds: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=2, ge=0)


class EvaluateOptions(ApiModel):
    """Options of the `evaluate` stage."""

    policies: list[str] = Field(default_factory=list, description="Stages to compare.")
    reference_dataset: DatasetSpec | None = Field(default=None, description="Set for perplexity.")
    max_new_tokens: int = Field(default=64, gt=0)


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
