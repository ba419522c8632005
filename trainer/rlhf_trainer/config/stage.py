"""`StageConfig`, the rendered config of one stage, and how a trainer loads it: validation
errors become a `ConfigError` whose lines name the file, the field and the fix."""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from rlhf_trainer.config.common import (
    FIELD_ERROR,
    ApiModel,
    DatasetSpec,
    Hyperparameters,
    LoRAOptions,
    ModelSource,
)
from rlhf_trainer.config.options import (
    GRPOOptions,
    OptionBlocks,
    PPOOptions,
    RRHFOptions,
)
from rlhf_trainer.config.stages import STAGES
from rlhf_trainer.config.targets import EnvironmentTarget, JudgeTarget, RolloutTarget

# The keys of STAGES, the stage table (config/stages.py), in its order (a test keeps them equal).
StageType = Literal["sft", "reward", "dpo", "rrhf", "ppo", "grpo", "feedback", "evaluate"]
STAGE_TYPES: tuple[str, ...] = typing.get_args(StageType)

# The keys of tasks.REWARD_FUNCTIONS (a test keeps them equal), which imports models' code.
REWARD_FUNCTION_NAMES: tuple[str, ...] = ("animal_sounds", "brief")


class _StageConfigHead(ApiModel):
    """StageConfig's fields before its option blocks."""

    run: str = Field(description="Name of the RLHFRun.")
    stage: str = Field(description="Name of the stage.")
    type: StageType
    model: ModelSource = Field(description="Initial weights (the base model or a `from` output).")
    dataset: DatasetSpec | None = None
    output_dir: str = Field(description="Folder for final/, checkpoints/, progress.json, metrics.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class StageConfig(OptionBlocks, _StageConfigHead):
    """What one trainer process needs: the rendered, self-contained config of a stage.

    Relative paths are resolved against the workspace (`$RLHF_WORKSPACE`, `/workspace` in a pod).
    """

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


def options_of(config: StageConfig) -> ApiModel:
    """The stage's options block (the stage table names its field), with the defaults where the
    config leaves it out."""
    field = STAGES[config.type].options
    block = getattr(config, field)
    if block is not None:
        return typing.cast(ApiModel, block)
    [options_class] = [t for t in typing.get_args(StageConfig.model_fields[field].annotation)
                       if t is not type(None)]  # fmt: skip
    return typing.cast(ApiModel, options_class())


def samples_online(config: StageConfig) -> bool:
    """Whether the stage samples from the policy as it trains: an online type, or one whose
    options turn it on (`rrhf.online`)."""
    kind = STAGES[config.type]
    if kind.online_run is None:
        return kind.online
    return bool(getattr(options_of(config), "online", False))


OnlineOptions = PPOOptions | GRPOOptions | RRHFOptions


def online_options(config: StageConfig) -> OnlineOptions:
    """The sampling options of a stage that samples online (`samples_online`)."""
    options = options_of(config)
    if not samples_online(config) or not isinstance(options, OnlineOptions):
        raise TypeError(f"a {config.type} stage does not sample from the policy as it trains")
    return options


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
