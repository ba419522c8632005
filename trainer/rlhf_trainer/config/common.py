"""The pieces every part of a stage's config is built from: the `ApiModel` base, field errors,
size limits, workspace paths, and the inputs common to all stage types (model source, dataset,
hyperparameters, LoRA)."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

DatasetFormat = Literal["jsonl", "hh", "preference", "ranked", "prompts", "shp", "tldr", "chat"]
DATASET_FORMATS: tuple[str, ...] = typing.get_args(DatasetFormat)
# The formats each reader of data/readers.py takes (load_sft_rows, load_preference_rows,
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


def workspace_root() -> Path:
    """The workspace folder: `$RLHF_WORKSPACE`, or /workspace as mounted in a pod."""
    return Path(os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE))


def resolve_path(path: str) -> Path:
    """Resolve a spec path: absolute paths stay, relative ones hang off the workspace."""
    p = Path(path)
    return p if p.is_absolute() else workspace_root() / p
