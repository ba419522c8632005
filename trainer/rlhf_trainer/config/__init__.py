"""Typed, torch-free configuration shared by the operator and the trainers.

The operator imports this package (and nothing else of `rlhf_trainer`): the pieces of the
`RLHFRun` spec that a trainer needs (model source, dataset, hyperparameters, per-algorithm
options) are defined once here, and the operator renders a `StageConfig` per stage into a
ConfigMap that the trainer reads back with `load_stage_config`.

Field names are camelCase on the wire (the Kubernetes convention) and snake_case in Python.
Every model forbids unknown fields, so a typo is an error that names the field.

Modules, by topic: `common` (the `ApiModel` base, limits, workspace paths, model, dataset,
hyperparameters, LoRA), `sampling` (the sampling fields' types), `options` (one options class
per stage type: a new algorithm's goes there), `targets` (rollout, judge and environment
servers), `stage` (`StageConfig` and loading it), `precision` (bf16 or not) and `stages` (the
stage table). This module only re-exports what the operator and the trainers import.
"""

from __future__ import annotations

from rlhf_trainer.config.common import KNOWN_FIELDS as KNOWN_FIELDS
from rlhf_trainer.config.common import READER_FORMATS as READER_FORMATS
from rlhf_trainer.config.common import WORKSPACE_ENV as WORKSPACE_ENV
from rlhf_trainer.config.common import ApiModel as ApiModel
from rlhf_trainer.config.common import DatasetSpec as DatasetSpec
from rlhf_trainer.config.common import DnsLabel as DnsLabel
from rlhf_trainer.config.common import Hyperparameters as Hyperparameters
from rlhf_trainer.config.common import LoRAOptions as LoRAOptions
from rlhf_trainer.config.common import ModelSource as ModelSource
from rlhf_trainer.config.common import SecretKeyRef as SecretKeyRef
from rlhf_trainer.config.common import field_error as field_error
from rlhf_trainer.config.common import resolve_path as resolve_path
from rlhf_trainer.config.options import PPO_MAX_PRESET as PPO_MAX_PRESET
from rlhf_trainer.config.options import DPOOptions as DPOOptions
from rlhf_trainer.config.options import EvaluateOptions as EvaluateOptions
from rlhf_trainer.config.options import FeedbackOptions as FeedbackOptions
from rlhf_trainer.config.options import GRPOOptions as GRPOOptions
from rlhf_trainer.config.options import OptionBlocks as OptionBlocks
from rlhf_trainer.config.options import OverlongPenalty as OverlongPenalty
from rlhf_trainer.config.options import PolicyGradientOptions as PolicyGradientOptions
from rlhf_trainer.config.options import PPOOptions as PPOOptions
from rlhf_trainer.config.options import RewardModelOptions as RewardModelOptions
from rlhf_trainer.config.options import RRHFOptions as RRHFOptions
from rlhf_trainer.config.options import SFTOptions as SFTOptions
from rlhf_trainer.config.precision import CPU_BF16_ENV as CPU_BF16_ENV
from rlhf_trainer.config.precision import Bf16Choice as Bf16Choice
from rlhf_trainer.config.precision import CpuBf16 as CpuBf16
from rlhf_trainer.config.precision import cpu_bf16_fallback_message as cpu_bf16_fallback_message
from rlhf_trainer.config.precision import cpu_bf16_from_cpuinfo as cpu_bf16_from_cpuinfo
from rlhf_trainer.config.precision import cpu_bf16_kept as cpu_bf16_kept
from rlhf_trainer.config.precision import read_cpuinfo as read_cpuinfo
from rlhf_trainer.config.precision import resolve_bf16 as resolve_bf16
from rlhf_trainer.config.stage import REWARD_FUNCTION_NAMES as REWARD_FUNCTION_NAMES
from rlhf_trainer.config.stage import STAGE_TYPES as STAGE_TYPES
from rlhf_trainer.config.stage import ConfigError as ConfigError
from rlhf_trainer.config.stage import StageConfig as StageConfig
from rlhf_trainer.config.stage import StageType as StageType
from rlhf_trainer.config.stage import format_validation_error as format_validation_error
from rlhf_trainer.config.stage import load_stage_config as load_stage_config
from rlhf_trainer.config.stage import online_options as online_options
from rlhf_trainer.config.stage import options_of as options_of
from rlhf_trainer.config.stage import samples_online as samples_online
from rlhf_trainer.config.stage import validation_problems as validation_problems
from rlhf_trainer.config.stages import STAGES as STAGES
from rlhf_trainer.config.stages import StageKind as StageKind
from rlhf_trainer.config.stages import option_blocks as option_blocks
from rlhf_trainer.config.stages import stage_types as stage_types
from rlhf_trainer.config.targets import IN_TRAINER as IN_TRAINER
from rlhf_trainer.config.targets import EnvironmentTarget as EnvironmentTarget
from rlhf_trainer.config.targets import EpisodeOptions as EpisodeOptions
from rlhf_trainer.config.targets import JudgeProtocol as JudgeProtocol
from rlhf_trainer.config.targets import JudgeRequestOptions as JudgeRequestOptions
from rlhf_trainer.config.targets import JudgeReward as JudgeReward
from rlhf_trainer.config.targets import JudgeTarget as JudgeTarget
from rlhf_trainer.config.targets import JudgeTemplates as JudgeTemplates
from rlhf_trainer.config.targets import RolloutClientOptions as RolloutClientOptions
from rlhf_trainer.config.targets import RolloutEngine as RolloutEngine
from rlhf_trainer.config.targets import RolloutTarget as RolloutTarget
