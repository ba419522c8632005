"""Hypothesis fuzzing of RLHFRun specs through validate, plan and render.

Whatever a user writes, the result is a structured error (SpecError, one line per problem
naming a field) or a valid plan whose objects render as YAML — never an unhandled exception.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import BASE
from rlhf_operator import api, yamlio
from rlhf_operator.planner import Observed, plan
from rlhf_trainer.config import STAGE_TYPES

pytestmark = pytest.mark.unit

EXAMPLES = 2000

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["sft", "dpo", "ppo", "x", "", "-", "a" * 80, "$(RANK)", "; rm -rf /"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)

FIELDS = [
    ("spec", "model"), ("spec", "trainer"), ("spec", "stages"), ("spec", "judge"),
    ("spec", "suspend"), ("spec", "workspace"), ("metadata", "name"), ("metadata", "labels"),
    ("spec", "stages", 0, "type"), ("spec", "stages", 0, "from"),
    ("spec", "stages", 0, "dataset"), ("spec", "stages", 0, "hyperparameters"),
    ("spec", "stages", 0, "reward"), ("spec", "stages", 0, "rollout"),
    ("spec", "stages", 1, "name"), ("spec", "stages", 1, "from"),
    ("spec", "stages", 1, "hyperparameters", "learningRate"),
    ("spec", "stages", 1, "hyperparameters", "batchSize"),
    ("spec", "trainer", "nodes"), ("spec", "trainer", "backend"),
    ("spec", "trainer", "resources"), ("spec", "model", "path"), ("spec", "model", "name"),
    ("apiVersion",), ("kind",),
]


def mutate(doc: dict[str, Any], path: tuple[Any, ...], value: Any, delete: bool) -> None:
    node: Any = doc
    for key in path[:-1]:
        in_dict = isinstance(node, dict) and key in node
        in_list = isinstance(node, list) and isinstance(key, int) and key < len(node)
        if in_dict or in_list:
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value


mutations = st.lists(
    st.tuples(st.sampled_from(FIELDS), json_value, st.booleans()), min_size=1, max_size=4
)
stage_types = st.sampled_from(STAGE_TYPES)


def check(doc: Any) -> str:
    """Run one document through validate, plan and render; return the outcome's kind."""
    try:
        run = api.parse_run(doc, "fuzz.yaml")
    except api.SpecError as err:
        assert err.problems and all(p.startswith("fuzz.yaml") for p in err.problems)
        return "refused"
    desired = plan(run, Observed())
    text = yamlio.dump_all(desired.children)
    assert list(yaml.safe_load_all(text)) == desired.children
    assert desired.status.observed_generation == run.metadata.generation
    if not desired.children:
        degraded = next(c for c in desired.status.conditions if c.type == "Degraded")
        assert degraded.status == "True" and degraded.message
        return "degraded"
    return "planned"


OUTCOMES: dict[str, int] = {}


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
@given(
    changes=mutations,
    types=st.lists(stage_types, min_size=2, max_size=2),
    online=st.booleans(),
    engine=st.sampled_from(["vllm", "vllm", "vllm", "lmdeploy"]),  # lmdeploy: validation refuses
    scheduled=st.sampled_from([False, False, False, True]),  # a TrainJob: the planner refuses
)
def test_mutated_specs_never_crash(
    changes: list[Any], types: list[str], online: bool, engine: str, scheduled: bool
) -> None:
    doc = copy.deepcopy(BASE)
    if scheduled:  # a TrainJob's runtime picks its scheduler, so the planner refuses one here
        doc["spec"]["trainer"] = {"backend": "trainjob", "schedulerName": "volcano"}
    for stage, stage_type in zip(doc["spec"]["stages"], types, strict=True):
        stage["type"] = stage_type
        stage["dataset"]["format"] = "preference"  # pairs: every stage type's reader takes them
        if stage_type in ("ppo", "grpo"):
            stage["reward"] = {"function": "animal_sounds"}  # else the API alone refuses them
            stage["rollout"] = {"engine": engine}
        if stage_type == "rrhf" and online:
            stage["rrhf"] = {"online": True}  # then the API wants a reward source
            stage["reward"] = {"function": "animal_sounds"}
    for path, value, delete in changes:
        mutate(doc, path, value, delete)
    outcome = check(doc)
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


@settings(max_examples=300, deadline=None, database=None)
@given(doc=json_value)
def test_arbitrary_documents_never_crash(doc: Any) -> None:
    check(doc)


def test_fuzzing_reached_every_outcome() -> None:
    """The generator is not degenerate: it produced refusals, refusals by the planner and
    valid plans (runs after the fuzz test in file order)."""
    assert sum(OUTCOMES.values()) >= EXAMPLES
    assert set(OUTCOMES) == {"refused", "degraded", "planned"}, OUTCOMES
