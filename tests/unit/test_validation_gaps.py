"""Specs that `rlhf validate` used to pass and that failed only when their stage started, after
every earlier stage's GPU hours (issue 23, items 3, 4 and 6): each is refused by api.parse_run
(so by `rlhf validate` and the admission webhook) naming its field, its fixed twin is accepted,
and the CRD refuses it too where its CEL rules or schema can say so."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_crd import cel_failures

from helpers import manifest
from rlhf_operator import api, cli, crd, sync
from rlhf_trainer.config import KNOWN_FIELDS, READER_FORMATS, REWARD_FUNCTION_NAMES, DatasetSpec
from rlhf_trainer.data import readers as data
from rlhf_trainer.errors import DataError
from rlhf_trainer.tasks import animal_sounds as tasks

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
SFT: Obj = {"name": "sft", "type": "sft", "dataset": {"path": "data/sft.jsonl"}}
PAIRS: Obj = {"path": "data/pairs.jsonl", "format": "preference"}
PROMPTS: Obj = {"path": "data/prompts.jsonl", "format": "prompts"}
RANKED: Obj = {"path": "data/ranked.jsonl", "format": "ranked"}
JUDGE: Obj = {"model": {"path": "models/judge"}}


def stage(kind: str, **fields: Any) -> Obj:
    """A second stage of type `kind` after SFT, trained from it."""
    return {"name": f"{kind}2" if kind == "sft" else kind, "type": kind, "from": "sft", **fields}


def ppo(**fields: Any) -> Obj:
    base = {"dataset": PROMPTS, "reward": {"function": "animal_sounds"}}
    return stage("ppo", **{**base, **fields})


def grpo(**fields: Any) -> Obj:
    base = {"dataset": PROMPTS, "reward": {"function": "animal_sounds"}}
    return stage("grpo", **{**base, **fields})


def run(*stages: Obj, hp: Obj | None = None, **spec: Any) -> Obj:
    """SFT (with hyperparameters `hp`), then `stages`."""
    first = {**SFT, "hyperparameters": hp} if hp else SFT
    return manifest(stages=[first, *stages], **spec)


def evaluate(**options: Any) -> Obj:
    return stage("evaluate", dataset=PROMPTS, evaluate={"policies": ["sft"], **options})


def from_(source: Obj, kind: str = "dpo", dataset: Obj = PAIRS) -> tuple[Obj, ...]:
    """`source` after SFT, then a `kind` stage started from it."""
    return source, {"name": "next", "type": kind, "from": source["name"], "dataset": dataset}


RM = stage("reward", dataset=PAIRS)
FEEDBACK = stage("feedback", dataset=RANKED)
NCCL = {"weightSync": "nccl"}
RANKS = "self.trainer.nodes"  # in the CEL rule that splits batchSize over the ranks
PAIR_READERS = "['dpo', 'reward']"  # in the CEL rule on what reward and dpo stages read

# id, bad spec, fixed spec, the field the problem names, a needle in the problem, a needle in a
# CEL rule that refuses it (None: not in CEL; "schema": the CRD schema's bounds refuse it)
CASES: list[tuple[str, Obj, Obj, str, str, str | None]] = [
    # a. sft.packing is not implemented
    ("packing", run(stage("sft", dataset=PAIRS, sft={"packing": True})),
     run(stage("sft", dataset=PAIRS, sft={"packing": False})),
     "spec.stages[1].sft.packing", "not implemented yet", "self.packing"),
    # b. a dataset format the stage's reader refuses
    ("dpo-on-prompts", run(stage("dpo", dataset=PROMPTS)), run(stage("dpo", dataset=PAIRS)),
     "spec.stages[1].dataset.format", "'prompts' cannot feed the dpo trainer", PAIR_READERS),
    ("reward-on-jsonl", run(stage("reward", dataset={"path": "d.jsonl"})), run(RM),
     "spec.stages[1].dataset.format", "'jsonl' cannot feed the reward trainer", PAIR_READERS),
    ("sft-on-ranked", run(stage("sft", dataset=RANKED)), run(stage("sft", dataset=PAIRS)),
     "spec.stages[1].dataset.format", "'ranked' cannot feed the sft trainer", "self.type == 'sft'"),
    ("offline-rrhf-on-prompts", run(stage("rrhf", dataset=PROMPTS)),
     run(stage("rrhf", dataset=RANKED)),
     "spec.stages[1].dataset.format", "cannot feed the offline rrhf trainer", "'rrhf' && !("),
    ("feedback-on-chat", run(stage("feedback", dataset={**PAIRS, "format": "chat"}), judge=JUDGE),
     run(FEEDBACK, judge=JUDGE),
     "spec.stages[1].dataset.format", "'chat' cannot feed the feedback trainer",
     "!(self.type == 'feedback') || !has(self.dataset)"),
    ("ptx-on-prompts", run(ppo(ppo={"ptxCoef": 0.5, "ptxDataset": PROMPTS})),
     run(ppo(ppo={"ptxCoef": 0.5, "ptxDataset": PAIRS})),
     "spec.stages[1].ppo.ptxDataset.format", "cannot feed the ptx LM loss", "ptxDataset.format"),
    ("eval-pairs-on-prompts", run(evaluate(preferenceDataset=PROMPTS)),
     run(evaluate(preferenceDataset=RANKED)),
     "spec.stages[1].evaluate.preferenceDataset.format", "reward-model accuracy",
     "preferenceDataset.format"),
    # c. batch sizes that do not split, statically
    ("batch-over-procs", run(hp={"batchSize": 6}, trainer={"nodes": 2, "nprocPerNode": 2}),
     run(hp={"batchSize": 8}, trainer={"nodes": 2, "nprocPerNode": 2}),
     "spec.stages[0].hyperparameters.batchSize", "does not divide into 4 ranks", RANKS),
    ("batch-over-gpus", run(hp={"batchSize": 12}, trainer={"nodes": 2, "gpusPerNode": 8}),
     run(hp={"batchSize": 32}, trainer={"nodes": 2, "gpusPerNode": 8}),
     "spec.stages[0].hyperparameters.batchSize", "2 nodes x 8 processes", RANKS),
    ("batch-over-accumulation", run(hp={"batchSize": 8, "gradientAccumulation": 3}),
     run(hp={"batchSize": 9, "gradientAccumulation": 3}),
     "spec.stages[0].hyperparameters.batchSize", "x 3 gradient-accumulation steps", RANKS),
    ("online-no-room", run(grpo(hyperparameters={"maxLength": 64})),
     run(grpo(hyperparameters={"maxLength": 65})),
     "spec.stages[1].hyperparameters.maxLength", "after grpo.maxNewTokens 64", "maxNewTokens"),
    ("grpo-samples", run(grpo(grpo={"rolloutBatchSize": 4, "numGenerations": 2},
                              hyperparameters={"batchSize": 16})),
     run(grpo(grpo={"rolloutBatchSize": 4, "numGenerations": 2},
              hyperparameters={"batchSize": 8})),
     "spec.stages[1].hyperparameters.batchSize", "do not divide the 8 samples", "numGenerations"),
    ("online-rrhf-queries", run(stage("rrhf", dataset=PROMPTS,
                                      reward={"function": "animal_sounds"},
                                      rrhf={"online": True, "rolloutBatchSize": 6})),
     run(stage("rrhf", dataset=PROMPTS, reward={"function": "animal_sounds"},
               rrhf={"online": True, "rolloutBatchSize": 8})),
     "spec.stages[1].hyperparameters.batchSize", "rrhf.rolloutBatchSize 6 x 1",
     "rrhf.rolloutBatchSize"),
    # d. reward functions the trainer does not have
    ("unknown-reward-function", run(ppo(reward={"function": "length"})),
     run(ppo(reward={"function": "my_rewards.text:length"})),
     "spec.stages[1].reward.function", "unknown reward function 'length'", None),
    ("module-reward-offline", run(stage("rrhf", dataset=RANKED,
                                        reward={"function": "my_rewards:length"})),
     run(stage("rrhf", dataset=RANKED, reward={"function": "brief"})),
     "spec.stages[1].reward.function", "an offline rrhf stage scores with a built-in", None),
    # e. ppo options that need a companion field
    ("ptx-without-data", run(ppo(ppo={"ptxCoef": 0.5})),
     run(ppo(ppo={"ptxCoef": 0.5, "ptxDataset": {"path": "data/sft.jsonl"}})),
     "spec.stages[1].ppo.ptxDataset", "ptxCoef > 0 mixes in an LM loss", "has(self.ptxDataset)"),
    ("adaptive-kl-without-target", run(ppo(ppo={"klController": "adaptive"})),
     run(ppo(ppo={"klController": "adaptive", "klTarget": 0.1})),
     "spec.stages[1].ppo.klTarget", "needs a target KL", "has(self.klTarget)"),
    # f. dataset.fields naming no field of the format
    ("unknown-dataset-field", run(stage("dpo", dataset={**PAIRS, "fields": {"answer": "a"}})),
     run(stage("dpo", dataset={**PAIRS, "fields": {"prompt": "question"}})),
     "spec.stages[1].dataset.fields", "answer is not a field of format 'preference'", None),
    # g. `from` naming a stage that writes no model, or no policy
    ("from-evaluate", run(*from_(evaluate())), run(evaluate(), {**from_(RM)[1], "from": "sft"}),
     "spec.stages[2].from", "'evaluate' (evaluate) writes its evaluation",
     "t.type in ['evaluate', 'feedback']"),
    ("from-feedback", run(*from_(FEEDBACK), judge=JUDGE),
     run(FEEDBACK, {**from_(FEEDBACK)[1], "from": "sft"}, judge=JUDGE),
     "spec.stages[2].from", "writes preference pairs, not a model",
     "t.type in ['evaluate', 'feedback']"),
    ("dpo-from-reward", run(*from_(RM)), run(RM, {**from_(RM)[1], "from": "sft"}),
     "spec.stages[2].from", "no policy to start a dpo stage from", "t.type == 'reward'"),
    ("ppo-from-reward", run(RM, {**ppo(), "from": "reward"}), run(RM, ppo()),
     "spec.stages[2].from", "no policy to start a ppo stage from", "t.type == 'reward'"),
    # h. rollouts the planner refuses
    ("lmdeploy-rollouts", run(ppo(rollout={"engine": "lmdeploy"})), run(ppo()),
     "spec.stages[1].rollout.engine", "'lmdeploy' cannot serve rollouts", "'lmdeploy'"),
    ("nccl-without-gpus", run(ppo(rollout=NCCL)),
     run(ppo(rollout=NCCL), trainer={"gpusPerNode": 1}),
     "spec.stages[1].rollout.weightSync", "nccl moves weights GPU to GPU", "'nccl') ||"),
    ("nccl-with-lora", run(ppo(rollout=NCCL, lora={"r": 8}), trainer={"gpusPerNode": 1}),
     run(ppo(lora={"r": 8}), trainer={"gpusPerNode": 1}),
     "spec.stages[1].rollout.weightSync", "syncs only its adapters", "has(self.lora)"),
    # i. non-finite numbers
    ("infinite-learning-rate", run(hp={"learningRate": math.inf}), run(hp={"learningRate": 1e-5}),
     "spec.stages[0].hyperparameters.learningRate", "finite number", None),
    ("nan-learning-rate", run(hp={"learningRate": math.nan}), run(hp={"learningRate": 1e-5}),
     "spec.stages[0].hyperparameters.learningRate", "finite number", None),
    # j. absurd sizes
    ("huge-batch", run(hp={"batchSize": 10**12}), run(hp={"batchSize": 2**20}),
     "spec.stages[0].hyperparameters.batchSize", "less than or equal to 1048576", "schema"),
    ("huge-max-length", run(hp={"maxLength": 2**21}), run(hp={"maxLength": 2**20}),
     "spec.stages[0].hyperparameters.maxLength", "less than or equal to 1048576", "schema"),
    ("huge-rollout-batch", run(grpo(grpo={"rolloutBatchSize": 2**21})),
     run(grpo(grpo={"rolloutBatchSize": 2**20})),
     "spec.stages[1].grpo.rolloutBatchSize", "less than or equal to 1048576", "schema"),
    ("huge-generations", run(grpo(grpo={"numGenerations": 2**11})),
     run(grpo(grpo={"numGenerations": 2**10})),
     "spec.stages[1].grpo.numGenerations", "less than or equal to 1024", "schema"),
    ("huge-new-tokens", run(ppo(ppo={"maxNewTokens": 2**18})),
     run(ppo(ppo={"maxNewTokens": 2**17}, hyperparameters={"maxLength": 2**18})),
     "spec.stages[1].ppo.maxNewTokens", "less than or equal to 131072", "schema"),
]  # fmt: skip
IDS = [case[0] for case in CASES]


def problems(doc: Obj) -> list[str]:
    try:
        api.parse_run(copy.deepcopy(doc), "run.yaml")
    except api.SpecError as err:
        return err.problems
    return []


@pytest.mark.parametrize(("name", "bad", "good", "field", "needle", "cel"), CASES, ids=IDS)
def test_refused_naming_the_field_and_its_fix_accepted(
    name: str, bad: Obj, good: Obj, field: str, needle: str, cel: str | None
) -> None:
    found = problems(bad)
    assert any(p.startswith(f"run.yaml: {field}: ") and needle in p for p in found), found
    assert problems(good) == []


def crd_schema() -> Obj:
    spec: Obj = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return spec["properties"]["spec"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "bad", "good", "field", "needle", "cel"), CASES, ids=IDS)
def test_the_crd_refuses_what_it_can_say(
    name: str, bad: Obj, good: Obj, field: str, needle: str, cel: str | None
) -> None:
    if cel is None:  # see spec_checks' docstring for why CEL does not say it
        return
    assert cel_failures(good["spec"]) == []
    if cel == "schema":
        with pytest.raises(jsonschema.ValidationError, match="is greater than the maximum"):
            jsonschema.Draft4Validator(crd_schema()).validate(bad["spec"])
        jsonschema.Draft4Validator(crd_schema()).validate(good["spec"])
        return
    failures = cel_failures(bad["spec"])
    assert any(cel in rule for rule in failures), failures


def test_every_example_passes_every_cel_rule() -> None:
    for path in sorted((ROOT / "manifests" / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert cel_failures(doc["spec"]) == [], path.name


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("learningRate: .inf", "spec.stages[0].hyperparameters.learningRate"),
        ("learningRate: .nan", "spec.stages[0].hyperparameters.learningRate"),
        ("batchSize: 1.0e+12", "spec.stages[0].hyperparameters.batchSize"),
    ],
)
def test_rlhf_validate_refuses_yaml_numbers(
    text: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_dump(manifest()).replace(
        "path: data/sft.jsonl\n", f"path: data/sft.jsonl\n    hyperparameters: {{{text}}}\n", 1
    )
    path = tmp_path / "run.yaml"
    path.write_text(doc)
    assert cli.main(["validate", str(path)]) == 1
    assert f"{path}: {field}: " in capsys.readouterr().err


def test_rlhf_validate_refuses_packing_and_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CASES[0][1]))
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: spec.stages[1].sft.packing: packing is not implemented yet; set it to" in err


def test_measured_non_finite_numbers_read_as_unknown() -> None:
    """Specs refuse NaN, but a trainer's NaN reward must never crash the operator."""
    assert api.StageMetrics(reward=math.nan, kl=math.inf, loss=-math.inf).dump() == {}
    assert api.RunStatus(reward=math.nan).reward is None
    progress = json.dumps({"step": 3, "metrics": {"reward": math.nan, "loss": 0.5}})
    pod = {"metadata": {"labels": {"rlhf.dev/stage": "ppo"},
                        "annotations": {"rlhf.dev/progress": progress}}}  # fmt: skip
    metrics = sync.progress_by_stage([pod])["ppo"]
    assert metrics.reward is None and metrics.loss == 0.5 and metrics.step == 3
    doc = {**manifest(), "status": {"reward": math.nan, "stages": [
        {"name": "sft", "type": "sft", "metrics": {"reward": math.inf}}]}}  # fmt: skip
    status = api.parse_run(doc).status
    assert status is not None and status.reward is None and status.stages[0].metrics
    assert status.stages[0].metrics.reward is None


def test_the_built_in_reward_functions_are_the_trainers() -> None:
    assert set(REWARD_FUNCTION_NAMES) == set(tasks.REWARD_FUNCTIONS)


@pytest.mark.parametrize("reader", sorted(READER_FORMATS))
def test_the_format_table_is_what_the_readers_take(reader: str, tmp_path: Path) -> None:
    """A reader refuses a format (before reading a row) exactly where the table says."""
    load = getattr(data, f"load_{reader.removesuffix('s')}_rows")  # load_prompt_rows
    for fmt in KNOWN_FIELDS:
        spec = DatasetSpec(path=str(tmp_path / "absent.jsonl"), format=fmt)  # type: ignore[arg-type]
        with pytest.raises(DataError) as err:
            load(spec)
        refused = "cannot feed" in str(err.value)
        assert refused == (fmt not in READER_FORMATS[reader]), (reader, fmt, str(err.value))
