"""The local executor's pure parts: how pod commands become local processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_run, manifest
from rlhf_operator import local
from rlhf_operator.local import expand, failure_message, local_argv, read_progress, remap

pytestmark = pytest.mark.unit


def test_expand_follows_kubelet_rules() -> None:
    env = {"RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    assert expand("--node-rank=$(RANK)", env) == "--node-rank=1"
    assert expand("$(MASTER_ADDR):$(MISSING)", env) == "10.0.0.1:$(MISSING)"
    assert expand("$RANK and ${RANK}", env) == "$RANK and ${RANK}", "only $(VAR) is expanded"


def test_remap_rewrites_mount_paths_only_at_path_boundaries(tmp_path: Path) -> None:
    mounts = {"/workspace": tmp_path / "w", "/etc/rlhf": tmp_path / "cfg"}
    assert remap("/workspace", mounts) == str(tmp_path / "w")
    assert remap("/etc/rlhf/sft.yaml", mounts) == str(tmp_path / "cfg" / "sft.yaml")
    assert remap("/workspace2/x", mounts) == "/workspace2/x"
    assert remap("--flag=/workspace/x", mounts) == "--flag=/workspace/x"


def test_local_argv_uses_this_interpreter() -> None:
    argv = local_argv(["torchrun", "--nnodes=1", "-m", "rlhf_trainer"])
    assert argv[1:3] == ["-m", "torch.distributed.run"] and argv[3:] == ["--nnodes=1", "-m",
                                                                         "rlhf_trainer"]


def test_failure_message_prefers_the_trainers_error_line(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("noise\nerror: data/sft.jsonl line 7: missing field \"response\"\nmore\n")
    assert failure_message([log]).startswith("data/sft.jsonl line 7")
    other = tmp_path / "b.log"
    other.write_text("a\nb\nc\nd\n")
    assert failure_message([other]) == "b | c | d"
    assert failure_message([tmp_path / "missing.log"]) == "the trainer exited non-zero"


def test_read_progress_tolerates_torn_and_odd_files(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    assert read_progress(path) is None
    path.write_text('{"step": 3, "totalSteps"')
    assert read_progress(path) is None
    path.write_text(json.dumps({"step": 3, "totalSteps": 10, "metrics": {"loss": 1.25}}))
    metrics = read_progress(path)
    assert metrics is not None
    assert (metrics.step, metrics.total_steps, metrics.loss) == (3, 10, 1.25)
    path.write_text(json.dumps({"step": "3", "metrics": ["x"]}))
    odd = read_progress(path)
    assert odd is not None and odd.step is None and odd.loss is None


def test_preflight_names_each_missing_model_and_lets_stage_outputs_be(tmp_path: Path) -> None:
    """Local model paths must exist before the run starts, except a run's own stage outputs
    (a judge served from an earlier `sft` stage's final/), which are written during it."""
    (tmp_path / "models" / "policy").mkdir(parents=True)
    doc = manifest(model={"path": "models/policy"})
    doc["spec"]["stages"][0]["model"] = {"path": "models/judge-base"}
    doc["spec"]["stages"][0]["dataset"] = {"path": str(tmp_path / "missing.jsonl")}
    doc["spec"]["stages"][1]["dataset"] = {"path": f"{doc['metadata']['name']}/sft/final/x.jsonl"}
    doc["spec"]["judge"] = {"model": {"path": f"{doc['metadata']['name']}/sft/final"}}
    problems = local.preflight(make_run(doc), tmp_path)
    assert problems[0].startswith(
        f"spec.stages[0].model.path: {tmp_path / 'models' / 'judge-base'} does not exist"
    )
    assert "relative paths are relative to --workdir" in problems[0]
    assert problems[1].startswith("spec.stages[0].dataset.path:")
    assert len(problems) == 2  # the judge and the second dataset come from stage sft
