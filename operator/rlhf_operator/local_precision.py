"""bf16 on this machine's CPU, for `rlhf run` (docs/DESIGN.md, "bf16 on CPU").

On a CPU without native bf16 (no AVX512-BF16, AMX-BF16 or aarch64 bf16) torch and vLLM emulate
bf16 matmuls at 10-100x the time of float32. A local run's trainers decide for themselves
(`rlhf_trainer.config.resolve_bf16`, on the same facts); this module makes the local executor's
vLLM servers follow them, so the parity probe compares float32 with float32, and tells the user
before anything starts. A cluster's manifests do not change: its pods run on GPUs.
"""

from __future__ import annotations

import os

from rlhf_operator import api
from rlhf_operator.planner import Event
from rlhf_trainer.config import (
    CPU_BF16_ENV,
    CpuBf16,
    cpu_bf16_fallback_message,
    cpu_bf16_from_cpuinfo,
    cpu_bf16_kept,
    read_cpuinfo,
)

FALLBACK_REASON = "Bf16FellBackToFloat32"
# vLLM's CPU backend resolves `--dtype auto` to bf16 for float32 and bf16 checkpoints, so `auto`
# falls back with `bfloat16`; an explicit float16 is a choice this check leaves alone.
BF16_SERVER_DTYPES = ("auto", "bfloat16")


def host_cpu_bf16() -> CpuBf16:
    """This machine's bf16 facts. No torch here (the operator image has none): a CPU that
    /proc/cpuinfo does not describe counts as unknown, and keeps bf16."""
    return cpu_bf16_from_cpuinfo(read_cpuinfo())


def host_bf16_kept(gpu: bool) -> bool:
    """Whether local processes on this machine may compute in bf16."""
    return gpu or cpu_bf16_kept(host_cpu_bf16(), os.environ.get(CPU_BF16_ENV))


def local_vllm_dtype(dtype: str | None, bf16_kept: bool) -> str | None:
    """The `--dtype` a local vLLM server gets for the command's `dtype` (None: not given, which
    vLLM reads as `auto`); None keeps the command as it is."""
    if bf16_kept or (dtype or "auto") not in BF16_SERVER_DTYPES:
        return None
    return "float32"


def bf16_fallback_events(run: api.RLHFRun, cpu: CpuBf16, bf16_kept: bool) -> list[Event]:
    """One Warning per stage whose `bf16: true` or `rollout.dtype: bfloat16` this machine turns
    into float32, with the trainer's own message (why, and how to keep bf16)."""
    if bf16_kept:
        return []
    events = []
    for stage in run.spec.stages:
        dtype = stage.rollout.dtype if stage.rollout is not None else None
        if stage.hyperparameters.bf16:
            message = cpu_bf16_fallback_message(cpu)
            if dtype in BF16_SERVER_DTYPES:
                message += f"; its local vLLM servers (rollout.dtype {dtype}) run float32 too"
        elif dtype == "bfloat16":
            message = cpu_bf16_fallback_message(
                cpu, "rollout.dtype: bfloat16", "rollout.dtype: float32"
            )
        else:
            continue
        events.append(Event("Warning", FALLBACK_REASON, f"Stage {stage.name}: {message}"))
    return events
