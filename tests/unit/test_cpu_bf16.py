"""bf16 on CPU (docs/DESIGN.md, "bf16 on CPU"): the precision decision from a CPU's flags, the
override, GPUs left alone, and the local vLLM servers following the trainer to float32. The
facts are inputs, so the fallback is tested on a machine that has native bf16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import make_run, manifest
from rlhf_operator import servers
from rlhf_operator.local_precision import (
    FALLBACK_REASON,
    bf16_fallback_events,
    local_vllm_dtype,
)
from rlhf_operator.local_servers import local_server_argv
from rlhf_trainer.config import (
    CpuBf16,
    cpu_bf16_from_cpuinfo,
    cpu_bf16_kept,
    read_cpuinfo,
    resolve_bf16,
)
from rlhf_trainer.runtime.distributed import cpu_bf16_from_capability

pytestmark = pytest.mark.unit

# Abridged /proc/cpuinfo of the machines the issue names: an AVX2-only desktop part, a
# Skylake-SP server (AVX-512, no bf16), Sapphire Rapids (AVX512-BF16 and AMX) and Graviton 3.
AVX2 = "processor\t: 0\nmodel name\t: Core i7\nflags\t\t: fpu sse4_2 avx avx2 fma bmi2\n"
AVX512 = "flags\t\t: fpu avx avx2 avx512f avx512bw avx512_vnni\n"
SPR = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd asimddp\n"
Obj = dict[str, Any]


@pytest.mark.parametrize(
    ("text", "native", "evidence"),
    [
        (AVX2, False, "AVX2 only: no avx512_bf16 or amx_bf16 flag"),
        (AVX512, False, "AVX-512 only"),
        (SPR, True, "amx_bf16 and avx512_bf16 in /proc/cpuinfo"),
        (GRAVITON3, True, "bf16 in /proc/cpuinfo"),
        (GRAVITON2, False, "aarch64 without the bf16 feature"),
        ("", None, "no CPU flags"),
    ],
)
def test_cpu_flags_say_whether_bf16_is_native(text: str, native: bool, evidence: str) -> None:
    cpu = cpu_bf16_from_cpuinfo(text)
    assert cpu.native is native
    assert evidence in cpu.evidence


def test_a_missing_cpuinfo_reads_as_nothing_known(tmp_path: Path) -> None:
    assert cpu_bf16_from_cpuinfo(read_cpuinfo(str(tmp_path / "cpuinfo"))).native is None


@pytest.mark.parametrize(
    ("capability", "machine", "native"),
    [("AVX2", "x86_64", False), ("DEFAULT", "AMD64", False), ("AVX512", "x86_64", None),
     ("DEFAULT", "arm64", None)],
)  # fmt: skip
def test_torch_capability_without_cpuinfo(capability: str, machine: str, native: bool) -> None:
    cpu = cpu_bf16_from_capability(capability, machine)
    assert cpu.native is native and capability in cpu.evidence


def test_bf16_on_an_avx2_cpu_falls_back_to_float32_naming_the_fix() -> None:
    choice = resolve_bf16(True, gpu=False, cpu=cpu_bf16_from_cpuinfo(AVX2), override=None)
    assert choice.bf16 is False and choice.fallback is not None
    assert choice.fallback.startswith("hyperparameters.bf16: true fell back to float32")
    assert "AVX2 only" in choice.fallback
    assert "RLHF_CPU_BF16=force" in choice.fallback and "bf16: false" in choice.fallback


@pytest.mark.parametrize("text", [SPR, GRAVITON3, ""])
def test_bf16_stays_on_a_cpu_with_native_or_unknown_bf16(text: str) -> None:
    assert resolve_bf16(True, False, cpu_bf16_from_cpuinfo(text), None) == (True, None)


@pytest.mark.parametrize("override", ["force", " FORCE\n"])
def test_the_override_keeps_bf16_on_an_avx2_cpu(override: str) -> None:
    assert resolve_bf16(True, False, cpu_bf16_from_cpuinfo(AVX2), override) == (True, None)


def test_another_override_value_still_falls_back() -> None:
    assert resolve_bf16(True, False, cpu_bf16_from_cpuinfo(AVX2), "1").bf16 is False


@pytest.mark.parametrize(("requested", "bf16"), [(True, True), (None, True), (False, False)])
def test_gpus_get_what_was_asked_for(requested: bool | None, bf16: bool) -> None:
    # The host CPU of a GPU machine says nothing about the precision its GPUs compute in.
    assert resolve_bf16(requested, True, cpu_bf16_from_cpuinfo(AVX2), None) == (bf16, None)


@pytest.mark.parametrize("requested", [None, False])
def test_float32_on_cpu_needs_no_warning(requested: bool | None) -> None:
    assert resolve_bf16(requested, False, cpu_bf16_from_cpuinfo(AVX2), None) == (False, None)


def ppo_run(hyperparameters: Obj, rollout: Obj) -> Any:
    ppo = {
        "name": "ppo", "type": "ppo", "from": "sft", "reward": {"function": "animal_sounds"},
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
        "hyperparameters": hyperparameters, "rollout": rollout,
    }  # fmt: skip
    sft = {"name": "sft", "type": "sft", "dataset": {"path": "data/sft.jsonl"}}
    return make_run(manifest(stages=[sft, ppo]))


def local_command(hyperparameters: Obj, rollout: Obj, bf16_kept: bool, gpu: bool = False) -> Any:
    """The argv `rlhf run` starts for the run's rollout server, from the cluster's builder."""
    run = ppo_run(hyperparameters, rollout)
    [deployment] = [
        c for c in servers.rollout_children(run, run.spec.stages[1]) if c["kind"] == "Deployment"
    ]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    return local_server_argv(command, 4321, gpu=gpu, bf16_kept=bf16_kept)


def dtypes(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--dtype"]


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_the_local_vllm_server_follows_the_trainer_to_float32(dtype: str) -> None:
    kept = cpu_bf16_kept(cpu_bf16_from_cpuinfo(AVX2), None)
    argv = local_command({"bf16": True}, {"dtype": dtype}, bf16_kept=kept)
    assert dtypes(argv) == ["float32"]


@pytest.mark.parametrize(("gpu", "kept"), [(False, True), (True, False)])
def test_the_local_vllm_server_keeps_its_dtype_with_bf16_or_a_gpu(gpu: bool, kept: bool) -> None:
    argv = local_command({"bf16": True}, {"dtype": "bfloat16"}, bf16_kept=kept, gpu=gpu)
    assert dtypes(argv) == ["bfloat16"]


def test_only_bf16_dtypes_fall_back() -> None:
    assert local_vllm_dtype(None, bf16_kept=False) == "float32"  # vLLM's default is auto
    assert local_vllm_dtype("float16", bf16_kept=False) is None
    assert local_vllm_dtype("float32", bf16_kept=False) is None
    argv = local_server_argv(["vllm", "serve", "m", "--dtype=bfloat16"], 1, False, False)
    assert dtypes(argv) == ["float32"] and "--dtype=bfloat16" not in argv


def test_rlhf_run_warns_for_each_stage_that_falls_back() -> None:
    cpu = cpu_bf16_from_cpuinfo(AVX2)
    run = ppo_run({"bf16": True}, {"dtype": "auto"})
    [event] = bf16_fallback_events(run, cpu, bf16_kept=False)
    assert event.type == "Warning" and event.reason == FALLBACK_REASON
    assert event.message.startswith("Stage ppo: hyperparameters.bf16: true fell back")
    assert "RLHF_CPU_BF16=force" in event.message and "run float32 too" in event.message
    assert bf16_fallback_events(run, cpu, bf16_kept=True) == []
    server_only = ppo_run({}, {"dtype": "bfloat16"})
    [event] = bf16_fallback_events(server_only, cpu, bf16_kept=False)
    assert "rollout.dtype: bfloat16 fell back to float32" in event.message
    assert "rollout.dtype: float32 to silence" in event.message
    assert bf16_fallback_events(ppo_run({}, {}), cpu, bf16_kept=False) == []


def test_unknown_cpus_keep_bf16() -> None:
    assert cpu_bf16_kept(CpuBf16(None, "no CPU flags in /proc/cpuinfo"), None)
