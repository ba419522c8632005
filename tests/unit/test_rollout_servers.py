"""Rollout servers: the vLLM and lmdeploy builders, the URLs the trainer gets, the planner
creating servers only while a ppo/grpo stage runs (and its trainer only once they are
available), and how the local executor maps a server Deployment to a process."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import job_with, make_run, manifest
from rlhf_operator import api, builders, servers, spec_checks
from rlhf_operator.local_servers import LocalServers, local_server_argv, local_server_env
from rlhf_operator.planner import Observed, plan
from rlhf_trainer.config import StageConfig

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
PPO: Obj = {
    "name": "ppo",
    "type": "ppo",
    "from": "sft",
    "reward": {"from": "rm"},
    "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
    "rollout": {"replicas": 2, "tensorParallelSize": 2, "maxModelLen": 4096, "dtype": "bfloat16"},
}
STAGES: list[Obj] = [
    {"name": "sft", "type": "sft", "dataset": {"path": "data/sft.jsonl"}},
    {"name": "rm", "type": "reward", "from": "sft",
     "dataset": {"path": "data/preference.jsonl", "format": "preference"}},
    PPO,
]  # fmt: skip


def run_with(stage: Obj | None = None, **spec: Any) -> api.RLHFRun:
    return make_run(manifest(stages=[*STAGES[:2], stage or PPO], **spec))


def admitted(stage: Obj, **spec: Any) -> api.RLHFRun:
    """A run as the models alone accept it, without parse_run's checks of what a stage would
    refuse at its start: what a cluster may hold from before those checks existed."""
    return api.RLHFRun.model_validate(manifest(stages=[*STAGES[:2], stage], **spec))


def name(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


def with_status(run: api.RLHFRun, previous: Any) -> api.RLHFRun:
    return run.model_copy(update={"status": previous.status})


def container(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def available(obj: Obj) -> Obj:
    status = {
        "availableReplicas": 1,
        "conditions": [{"type": "Available", "status": "True"}],
    }
    return {**copy.deepcopy(obj), "status": status}


def test_vllm_rollout_deployment_and_service() -> None:
    run = run_with()
    children = servers.rollout_children(run, run.spec.stages[2])
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("Deployment", "demo-ppo-rollout-0"), ("Service", "demo-ppo-rollout-0"),
        ("Deployment", "demo-ppo-rollout-1"), ("Service", "demo-ppo-rollout-1"),
    ]  # fmt: skip
    for child in children:
        kubernetes_validate.validate(child, "1.34", strict=True)
        assert child["metadata"]["labels"][builders.LABEL_COMPONENT] == "rollout"
        assert child["metadata"]["ownerReferences"][0]["kind"] == "RLHFRun"
    deployment, service = children[:2]
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert children[2]["spec"]["selector"]["matchLabels"]["rlhf.dev/replica"] == "1"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    c = container(deployment)
    assert c["image"] == api.DEFAULT_VLLM_IMAGE
    assert c["command"] == [
        "vllm", "serve", "/workspace/demo/sft/final", "--served-model-name", "policy",
        "--port", "8000", "--tensor-parallel-size", "2", "--dtype", "bfloat16",
        "--gpu-memory-utilization", "0.9", "--max-model-len", "4096",
    ]  # fmt: skip
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/v1/models", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in c["env"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"workspace": "/workspace", "dshm": "/dev/shm"}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert service["spec"]["ports"][0] == {
        "name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"
    }  # fmt: skip


def test_nccl_sync_and_hub_models_and_lmdeploy() -> None:
    rollout = api.Rollout(weight_sync="nccl", engine="vllm")
    model = api.ModelSource(name="Qwen/Qwen2.5-0.5B-Instruct", revision="main")
    argv = servers.vllm_command(model, rollout)
    assert argv[2:5] == ["Qwen/Qwen2.5-0.5B-Instruct", "--revision", "main"]
    assert argv[-2:] == ["--weight-transfer-config", '{"backend": "nccl"}']
    settings = api.Rollout(engine="lmdeploy", tensor_parallel_size=4)
    lmdeploy = servers.lmdeploy_command(model, settings)
    assert lmdeploy[:4] == ["lmdeploy", "serve", "api_server", "Qwen/Qwen2.5-0.5B-Instruct"]
    assert lmdeploy[lmdeploy.index("--tp") + 1] == "4"
    assert lmdeploy[lmdeploy.index("--server-port") + 1] == "8000"


def test_the_trainer_gets_one_service_url_per_replica() -> None:
    run = run_with()
    data = builders.build_configmap(run, run.spec.stages[2])["data"]["ppo.yaml"]
    config = StageConfig.model_validate(yaml.safe_load(data))
    assert config.rollout is not None
    assert config.rollout.urls == [
        "http://demo-ppo-rollout-0.team-a.svc:8000",
        "http://demo-ppo-rollout-1.team-a.svc:8000",
    ]
    assert config.rollout.served_model == "policy" and config.rollout.weight_sync == "disk"
    assert config.reward_model_path == "demo/rm/final"
    sft = builders.build_stage_config(run, run.spec.stages[0])
    assert sft.rollout is None


def test_planner_starts_servers_first_and_the_trainer_once_they_are_available() -> None:
    run = run_with()
    done = [job_with(c, "Succeeded") if c["kind"] == "PyTorchJob" else c
            for name in ("sft", "rm") for c in backends_children(run, name)]  # fmt: skip
    first = plan(run, Observed(children=done, now="t1"))
    kinds = [(c["kind"], name(c)) for c in first.children if "ppo" in name(c)]
    assert ("PyTorchJob", "demo-ppo") not in kinds
    assert ("Deployment", "demo-ppo-rollout-0") in kinds
    assert ("Service", "demo-ppo-rollout-1") in kinds
    ppo = next(s for s in first.status.stages if s.name == "ppo")
    assert ppo.phase == "Pending" and ppo.message == "Waiting for rollout servers: 0/2 available"
    ppo_children = [c for c in first.children if name(c).startswith("demo-ppo")]
    servers_up = [available(c) if c["kind"] == "Deployment" else c for c in ppo_children]
    second = plan(with_status(run, first), Observed(children=done + servers_up))
    # The job runs on even if a server restarts (no gate once the job exists).
    job = next(c for c in second.children if c["kind"] == "PyTorchJob" and name(c) == "demo-ppo")
    restarting = [*done, *ppo_children, job_with(job, "Running")]
    third = plan(run, Observed(children=restarting))
    assert any(c["metadata"]["name"] == "demo-ppo" for c in third.children)
    # Finished: the servers go, the job stays as the record.
    finished = [*done, *servers_up, job_with(job, "Succeeded")]
    last = plan(run, Observed(children=finished))
    names = {name(c) for c in last.children}
    assert "demo-ppo" in names and not any("rollout" in n for n in names)
    assert last.status.phase == "Succeeded"


def backends_children(run: api.RLHFRun, stage: str) -> list[Obj]:
    from rlhf_operator import backends

    return backends.build_stage_children(run, next(s for s in run.spec.stages if s.name == stage))


def test_a_server_that_cannot_start_fails_the_stage_until_the_spec_changes() -> None:
    run = run_with()
    done = [job_with(c, "Succeeded") if c["kind"] == "PyTorchJob" else c
            for name in ("sft", "rm") for c in backends_children(run, name)]  # fmt: skip
    first = plan(run, Observed(children=done, now="t1"))
    broken = list(done)
    for child in first.children:
        if not name(child).startswith("demo-ppo"):
            continue
        if child["kind"] == "Deployment":
            child = copy.deepcopy(child)
            child["status"] = {"conditions": [{
                "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing."}]}  # fmt: skip
        broken.append(child)
    failed = plan(with_status(run, first), Observed(children=broken, now="t2"))
    ppo = next(s for s in failed.status.stages if s.name == "ppo")
    assert ppo.phase == "Failed" and "demo-ppo-rollout-0 failed" in (ppo.message or "")
    assert failed.status.phase == "Failed"
    assert not any(c["kind"] == "Deployment" for c in failed.children)  # GPUs freed
    # The failed Deployment is gone now; the failure stays until the spec changes.
    after = plan(with_status(run, failed), Observed(children=done, now="t3"))
    assert next(s for s in after.status.stages if s.name == "ppo").phase == "Failed"
    edited = with_status(run, failed).model_copy(
        update={"metadata": run.metadata.model_copy(update={"generation": 2})}
    )
    retry = plan(edited, Observed(children=done, now="t4"))
    assert next(s for s in retry.status.stages if s.name == "ppo").phase == "Pending"


def test_suspend_scales_servers_to_zero() -> None:
    run = run_with(suspend=True)
    [deployment] = [c for c in servers.rollout_children(run, run.spec.stages[2])
                    if c["kind"] == "Deployment"][:1]  # fmt: skip
    assert deployment["spec"]["replicas"] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rollout": {"engine": "lmdeploy"}}, "rollout.engine: 'lmdeploy' cannot serve rollouts"),
        ({"rollout": {"weightSync": "nccl"}}, "rollout.weightSync: nccl moves weights GPU to GPU"),
    ],
)
def test_online_stages_that_cannot_run_are_refused(change: Obj, message: str) -> None:
    with pytest.raises(api.SpecError, match=message.replace("(", r"\(")):
        run_with({**PPO, **change})  # `rlhf validate` and the webhook refuse it
    run = admitted({**PPO, **change})  # and the planner, should the cluster hold one already
    p = plan(run, Observed())
    degraded = next(c for c in p.status.conditions if c.type == "Degraded")
    assert degraded.status == "True" and message in degraded.message
    assert degraded.message.startswith("spec.stages[2]") and p.children == []


def test_lora_stages_serve_a_runtime_loaded_adapter() -> None:
    run = run_with({**PPO, "lora": {"r": 12}})
    deployment = servers.rollout_children(run, run.spec.stages[2])[0]
    c = container(deployment)
    assert c["command"][-5:] == ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "1"]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    target = builders.rollout_target(run, run.spec.stages[2])
    assert target is not None and target.lora_adapter == "policy-lora"
    nccl = admitted({**PPO, "lora": {"r": 8}, "rollout": {"weightSync": "nccl"}},
                    trainer={"gpusPerNode": 8})  # fmt: skip
    problem = spec_checks.online_stage_problem(nccl, 2, nccl.spec.stages[2])
    assert problem is not None and "syncs only its adapters" in problem


def test_nccl_runs_with_gpus() -> None:
    run = run_with({**PPO, "rollout": {"weightSync": "nccl"}}, trainer={"gpusPerNode": 8})
    assert spec_checks.online_stage_problem(run, 2, run.spec.stages[2]) is None


def test_local_vllm_command_on_cpu_and_gpu() -> None:
    argv = ["vllm", "serve", "/w/m", "--served-model-name", "policy", "--port", "8000",
            "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9"]  # fmt: skip
    cpu = local_server_argv(argv, 4321, gpu=False)
    assert cpu[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cpu[3:5] == ["--model", "/w/m"]
    assert cpu[cpu.index("--port") + 1] == "4321" and cpu.count("--port") == 1
    assert cpu[cpu.index("--host") + 1] == "127.0.0.1"
    assert cpu[cpu.index("--gpu-memory-utilization") + 1] == "0.15"
    assert {"--enforce-eager", "--no-enable-chunked-prefill"} <= set(cpu)
    assert cpu[cpu.index("--distributed-executor-backend") + 1] == "uni"
    # vLLM's CPU platform keeps `uni` only with this variable at 0.
    assert local_server_env(cpu) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    gpu = local_server_argv(argv, 4321, gpu=True)
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.9"
    assert "--enforce-eager" not in gpu and local_server_env(gpu) == {}
    with pytest.raises(ValueError, match="cannot run the server command"):
        local_server_argv(["sglang", "serve"], 1, gpu=False)


def test_local_service_urls_are_rewritten_to_the_servers_ports(tmp_path: Path) -> None:
    run = run_with()
    children = servers.rollout_children(run, run.spec.stages[2])
    ports = iter([5001, 5002])
    started: list[list[str]] = []

    def spawn(pod: Obj, log: Any, to_local: Any) -> Any:
        started.append(to_local(list(pod["containers"][0]["command"])))

        class Proc:
            pid = 0

            def poll(self) -> int | None:
                return None

        return Proc()

    pool = LocalServers(spawn, log_dir=tmp_path, free_port=lambda: next(ports))
    pool.apply(children)
    assert [a[a.index("--port") + 1] for a in started] == ["5001", "5002"]
    text = "urls:\n- http://demo-ppo-rollout-0.team-a.svc:8000\n- http://demo-ppo-rollout-1.team-a.svc:8000\n"
    assert pool.rewrite_urls(text) == "urls:\n- http://127.0.0.1:5001\n- http://127.0.0.1:5002\n"
    observed = pool.observe()
    deployment = next(o for o in observed if o["kind"] == "Deployment")
    assert not servers.deployment_available(deployment)  # nothing answers /health there
    pool.servers.clear()


def test_servers_keep_root_but_drop_what_root_brings() -> None:
    """Upstream vLLM/lmdeploy images run as root; the pod keeps root (no runAsUser, writable
    root filesystem for their caches) but escalates nothing, runs under RuntimeDefault seccomp
    and holds only DAC_OVERRIDE (to write into the trainer-owned workspace)."""
    feedback = {"name": "pairs", "type": "feedback", "from": "sft",
                "dataset": {"path": "data/prompts.jsonl", "format": "prompts"}}  # fmt: skip
    judge = {"model": {"path": "models/judge"}}
    for rollout in ({"engine": "vllm"}, {"engine": "lmdeploy"}):  # lmdeploy samples, not ppo
        run = run_with({**feedback, "rollout": rollout}, judge=judge)
        for child in servers.rollout_children(run, run.spec.stages[2]):
            if child["kind"] != "Deployment":
                continue
            security = container(child)["securityContext"]
            assert security == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"], "add": ["DAC_OVERRIDE"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            }
            assert "runAsNonRoot" not in security and "readOnlyRootFilesystem" not in security
            assert "securityContext" not in child["spec"]["template"]["spec"]
            kubernetes_validate.validate(child, "1.34", strict=True)


IN_TRAINER: Obj = {**PPO, "rollout": {"engine": "trainer"}}


def test_the_trainer_engine_runs_no_servers_and_starts_the_job_at_once() -> None:
    run = run_with(IN_TRAINER)
    assert servers.rollout_children(run, run.spec.stages[2]) == []
    assert spec_checks.online_stage_problem(run, 2, run.spec.stages[2]) is None
    target = builders.rollout_target(run, run.spec.stages[2])
    assert target is not None and target.engine == "trainer" and target.urls == []
    data = builders.build_configmap(run, run.spec.stages[2])["data"]["ppo.yaml"]
    config = StageConfig.model_validate(yaml.safe_load(data))  # the trainer reads it back
    assert config.rollout is not None and config.rollout.engine == "trainer"
    done = [job_with(c, "Succeeded") if c["kind"] == "PyTorchJob" else c
            for name in ("sft", "rm") for c in backends_children(run, name)]  # fmt: skip
    first = plan(run, Observed(children=done, now="t1"))
    ppo = [c["kind"] for c in first.children if name(c).startswith("demo-ppo")]
    assert sorted(ppo) == ["ConfigMap", "PyTorchJob"]  # no Deployment, no Service, no wait


@pytest.mark.parametrize(
    ("rollout", "stage", "field"),
    [
        ({"replicas": 2}, {}, "rollout.replicas"),
        ({"tensorParallelSize": 2}, {}, "rollout.tensorParallelSize"),
        ({"weightSync": "nccl"}, {}, "rollout.weightSync"),
        ({"image": "vllm/vllm-openai:v0.11.0"}, {}, "rollout.image"),
        ({}, {"ppo": {"async": True}}, "ppo.async"),
        ({}, {"lora": {"r": 8}}, "rollout.engine"),
    ],
)
def test_what_the_trainer_engine_cannot_combine_is_refused_with_the_field(
    rollout: Obj, stage: Obj, field: str
) -> None:
    from test_crd import cel_failures

    bad = manifest(stages=[*STAGES[:2], {**PPO, "rollout": {"engine": "trainer", **rollout},
                                         **stage}])  # fmt: skip
    with pytest.raises(api.SpecError, match=field.replace(".", r"\.")):
        api.parse_run(bad)
    assert cel_failures(bad["spec"]), "the CRD's CEL rules let it through"
    good = manifest(stages=[*STAGES[:2], {**PPO, "rollout": {"engine": "trainer"}}])
    assert cel_failures(good["spec"]) == []


def test_a_feedback_stage_cannot_sample_in_the_trainer() -> None:
    from test_crd import cel_failures

    feedback = {"name": "fb", "type": "feedback", "from": "sft", "rollout": {"engine": "trainer"},
                "dataset": {"path": "data/prompts.jsonl", "format": "prompts"}}  # fmt: skip
    bad = manifest(stages=[STAGES[0], feedback], judge={"model": {"path": "models/judge"}})
    with pytest.raises(api.SpecError, match="feedback"):
        api.parse_run(bad)
    assert any("feedback" in rule for rule in cel_failures(bad["spec"]))


def test_install_defaults_give_no_server_image_to_the_trainer_engine() -> None:
    from rlhf_operator.defaults import with_install_defaults

    run = run_with(IN_TRAINER)
    env = {"RLHF_DEFAULT_VLLM_IMAGE": "registry/vllm:1", "RLHF_DEFAULT_TRAINER_IMAGE": "t:1"}
    rollout = with_install_defaults(run, env).spec.stages[2].rollout
    assert rollout is not None and rollout.image is None


def test_rollout_servers_read_a_stage_model_with_its_own_token() -> None:
    """A stage with its own hub `model` and token: its rollout servers download that model, so
    they get that token, as its trainer does; without one they keep spec.model's."""
    ppo = {k: v for k, v in PPO.items() if k != "from"}
    own = {"name": "org/other-policy", "tokenSecretRef": {"name": "other-hf", "key": "hf"}}
    base = {"name": "org/policy", "tokenSecretRef": {"name": "base-hf", "key": "token"}}
    for stage_model, secret in ((own, "other-hf"), (None, "base-hf")):
        stage = ppo if stage_model is None else {**ppo, "model": stage_model}
        run = run_with(stage, model=base)
        ppo_stage = run.spec.stages[-1]
        deployment = servers.rollout_children(run, ppo_stage)[0]
        trainer = builders.trainer_pod_template(run, ppo_stage)["spec"]["containers"][0]
        for env in (container(deployment)["env"], trainer["env"]):
            token = next(e for e in env if e["name"] == "HF_TOKEN")
            assert token["valueFrom"]["secretKeyRef"]["name"] == secret
        served = builders.stage_model(run, ppo_stage).name
        assert served == (own["name"] if stage_model else "org/policy")
        assert served in container(deployment)["command"]
