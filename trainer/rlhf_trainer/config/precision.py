"""Whether a trainer computes in bf16 (docs/DESIGN.md, "bf16 on CPU").

Here rather than in either package because both sides of a local run decide: the trainer its
own precision, the local executor its vLLM servers' dtype. The same function on the same facts
keeps the parity probe comparing like with like.
"""

from __future__ import annotations

import typing
from pathlib import Path

CPU_BF16_ENV = "RLHF_CPU_BF16"
CPU_BF16_FORCE = "force"
# Flags of bf16 arithmetic in hardware: x86 (Cooper Lake, Sapphire Rapids, Zen 4 and later) and
# aarch64 (Armv8.6 `bf16`). Without one torch emulates bf16 matmuls, 10-100x slower than float32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


class CpuBf16(typing.NamedTuple):
    """What is known of a CPU's bf16: `native` is None when nothing says either way."""

    native: bool | None
    evidence: str


class Bf16Choice(typing.NamedTuple):
    """The precision a trainer computes in; `fallback` says why a requested bf16 is off."""

    bf16: bool
    fallback: str | None = None


def read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    """The text of /proc/cpuinfo, or "" where there is none (macOS, Windows)."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_bf16_from_cpuinfo(text: str) -> CpuBf16:
    """Read the first `flags` (x86) or `Features` (aarch64) line of /proc/cpuinfo."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in ("flags", "Features"):
            continue
        flags = set(value.split())
        found = sorted(NATIVE_BF16_FLAGS & flags)
        if found:
            return CpuBf16(True, f"{' and '.join(found)} in /proc/cpuinfo")
        if key.strip() == "Features":
            return CpuBf16(False, "aarch64 without the bf16 feature in /proc/cpuinfo")
        level = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "pre-AVX2"
        return CpuBf16(False, f"{level} only: no avx512_bf16 or amx_bf16 flag in /proc/cpuinfo")
    return CpuBf16(None, "no CPU flags in /proc/cpuinfo")


def cpu_bf16_kept(cpu: CpuBf16, override: str | None) -> bool:
    """Whether bf16 stays on for this CPU: unless it is known to lack native bf16 and
    `RLHF_CPU_BF16` is not `force`. Unknown CPUs keep what was asked for."""
    return cpu.native is not False or (override or "").strip().lower() == CPU_BF16_FORCE


def cpu_bf16_fallback_message(
    cpu: CpuBf16, setting: str = "hyperparameters.bf16: true", quiet: str = "bf16: false"
) -> str:
    """Why `setting` became float32 here, and the two ways out."""
    return (
        f"{setting} fell back to float32: this CPU has no native bf16 ({cpu.evidence}), where "
        f"bf16 matmuls run 10-100x slower than float32; set {CPU_BF16_ENV}={CPU_BF16_FORCE} to "
        f"keep bf16 anyway, or {quiet} to silence this"
    )


def resolve_bf16(
    requested: bool | None, gpu: bool, cpu: CpuBf16, override: str | None
) -> Bf16Choice:
    """Training precision from `hyperparameters.bf16` (unset: bf16 with a GPU, float32 without),
    the device, this CPU's bf16 facts and `$RLHF_CPU_BF16`. GPUs get what was asked for."""
    if requested is None:
        return Bf16Choice(gpu)
    if not requested or gpu or cpu_bf16_kept(cpu, override):
        return Bf16Choice(requested)
    return Bf16Choice(False, cpu_bf16_fallback_message(cpu))
