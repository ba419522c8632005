"""A smoke run of `make bench`: the harness runs end to end at the smallest sizes and writes its
sections, so a bench that broke (an API moved, a peer's config changed) fails here rather than
on the day someone measures. The figures mean nothing at this size and nothing is asserted on
them; each section goes to a scratch copy of docs/BENCHMARKS.md, never the real one.

Covered, on the tiny model: DPO and SFT against TRL (`trainers.py`, in float32 and bf16), GRPO
end to end against TRL (`online.py`, with both of our rollout engines: the trainer's own and a
real vLLM server; and both sides in bf16), PPO end to end against TRL 1.12.0 (`online.py`,
which installs it into a cache folder), the roofline (`roofline.py`: matmul rates and each
phase's share) and the growth sweep (`growth.py`: its table and PNG); and the operator at scale
(`operator_scale.py`, a few runs). Not run here, for CI time: `fsdp_memory.py` (the 20M
model), `rollout.py` and `weight_sync.py` (a vLLM server each).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RATIO = r"(\d+\.\d\dx|n/a)"


def run_bench(script: str, *args: str, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def section(doc: Path, name: str) -> str:
    text = doc.read_text()
    match = re.search(rf"<!-- bench:{name} -->\n(.*?)\n<!-- /bench:{name} -->", text, re.S)
    assert match, f"no bench:{name} section in {doc}"
    return match.group(1)


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    copy = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "docs" / "BENCHMARKS.md", copy)
    return copy


def test_trainers_bench_writes_dpo_and_sft_tables(doc: Path) -> None:
    before = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    run_bench("trainers.py", "--stages", "dpo", "sft", "--models", "tiny", "--repeats", "1",
              "--steps", "3", "--warmup", "1", "--batch", "4", "--max-length", "64",
              "--doc", str(doc))  # fmt: skip
    for name in ("dpo", "sft"):
        body = section(doc, name)
        row = rf"^\| tiny \(0\.46M\) \| [\d.]+ \| [\d.]+ \| {RATIO} \|"
        assert re.search(row, body, re.M), body
        assert "--repeats 1" in body
    assert (ROOT / "docs" / "BENCHMARKS.md").read_text() == before


def test_online_bench_runs_grpo_against_trl(doc: Path) -> None:
    run_bench("online.py", "--models", "tiny", "--algos", "grpo", "--repeats", "1", "--steps",
              "3", "--warmup", "1", "--prompts", "2", "--generations", "2",
              "--max-new-tokens", "4", "--no-trl-vllm", "--doc", str(doc))  # fmt: skip
    body = section(doc, "online")
    for ours in ("ours, `engine: trainer`", "ours, vLLM server"):
        shape = rf"^\| tiny \(0\.46M\) \| GRPO, 2 prompts x 2 \| {re.escape(ours)} \|"
        assert re.search(shape + rf" [\d.]+ \| [\d.]+ \| {RATIO} \|", body, re.M), body
        phases = rf"^\| tiny \(0\.46M\) \| GRPO \| {re.escape(ours)} \| [\d.]+ \| [\d.]+ \|"
        assert re.search(phases, body, re.M), body


def test_online_bench_runs_both_sides_in_bf16(doc: Path) -> None:
    """`--precision bf16`: each side's own report says it computed in bf16 (the bench refuses a
    run that did not), and the results go to their own section."""
    run_bench("online.py", "--models", "tiny", "--algos", "grpo", "--repeats", "1", "--steps",
              "3", "--warmup", "1", "--prompts", "2", "--generations", "2",
              "--max-new-tokens", "4", "--no-trl-vllm", "--engines", "trainer",
              "--precision", "bf16", "--doc", str(doc))  # fmt: skip
    body = section(doc, "online-bf16")
    shape = r"^\| tiny \(0\.46M\) \| GRPO, 2 prompts x 2 \| ours, `engine: trainer` \|"
    assert re.search(shape + rf" [\d.]+ \| [\d.]+ \| {RATIO} \|", body, re.M), body
    assert "bf16 mixed precision" in body and "--precision bf16" in body
    assert "ours, vLLM server" not in body
    assert section(doc, "online") == section(ROOT / "docs" / "BENCHMARKS.md", "online")


def test_trainers_bench_runs_both_sides_in_bf16(doc: Path) -> None:
    run_bench("trainers.py", "--stages", "sft", "--models", "tiny", "--repeats", "1",
              "--steps", "2", "--warmup", "1", "--batch", "4", "--max-length", "32",
              "--precision", "bf16", "--doc", str(doc))  # fmt: skip
    body = section(doc, "sft-bf16")
    assert re.search(rf"^\| tiny \(0\.46M\) \| [\d.]+ \| [\d.]+ \| {RATIO} \|", body, re.M), body
    assert "bf16 mixed precision" in body and "torch CPU capability" in body


def test_online_bench_runs_ppo_against_trl_1_12(doc: Path) -> None:
    run_bench("online.py", "--models", "tiny", "--algos", "ppo", "--repeats", "1", "--steps",
              "2", "--warmup", "1", "--ppo-prompts", "2", "--max-new-tokens", "4",
              "--engines", "trainer", "--no-trl-vllm", "--doc", str(doc))  # fmt: skip
    body = section(doc, "online")
    shape = r"^\| tiny \(0\.46M\) \| PPO, 2 prompts x 1 \| ours, `engine: trainer` \|"
    assert re.search(shape + rf" [\d.]+ \| [\d.]+ \| {RATIO} \|", body, re.M), body


def test_roofline_bench_writes_rates_and_shares(doc: Path) -> None:
    run_bench("roofline.py", "--model", "tiny", "--repeats", "1", "--steps", "3",
              "--warmup", "1", "--batch", "4", "--max-length", "32", "--calls", "1",
              "--doc", str(doc))  # fmt: skip
    body = section(doc, "roofline")
    for phase in ("SFT", "DPO"):
        for dtype in ("float32", "bf16") if phase == "SFT" else ("float32",):
            assert re.search(rf"^\| {phase} \| \d+ \| {dtype} \| [\d.]+ \| [\d.]+ \|", body,
                             re.M), body  # fmt: skip
        share = re.search(rf"^\| {phase} \| [\d.]+ \| \d+ \| \d+ \| [\d.]+ \| (\d+)% \|$",
                          body, re.M)  # fmt: skip
        assert share and int(share.group(1)) > 0, body


def test_growth_bench_writes_a_table_and_a_plot(doc: Path, tmp_path: Path) -> None:
    png = tmp_path / "growth.png"
    run_bench("growth.py", "--model", "tiny", "--steps", "2", "--warmup", "1", "--prompts", "1",
              "2", "--lengths", "4", "8", "--generations", "2", "--doc", str(doc),
              "--plot", str(png))  # fmt: skip
    body = section(doc, "growth")
    # (1, 8) and (2, 4) and the shared middle point (2, 8): 3 rows
    rows = re.findall(r"^\| (\d+) \| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", body, re.M)
    assert sorted(rows) == [("2", "8"), ("4", "4"), ("4", "8")], body
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ours_writes_a_profile_of_its_stage(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`bench/ours.py --profile FILE`: torch's profiler over the stage, its ops in a table."""
    out = tmp_path / "profile.txt"
    run_bench("ours.py", "sft", "--model", str(tiny_model_dir), "--workdir",
              str(tmp_path / "w"), "--steps", "2", "--batch", "4", "--max-length", "32",
              "--profile", str(out))  # fmt: skip
    text = out.read_text()
    assert "Self CPU" in text and "aten::mm" in text, text[:2000]


def test_operator_scale_bench_runs_a_few_runs() -> None:
    out = run_bench("operator_scale.py", "--runs", "6", "--namespaces", "2", "--repeats", "1",
                    "--no-doc")  # fmt: skip
    assert "6 RLHFRuns (the tests' two-stage sft run) POSTed at once" in out, out
    assert re.search(r"^\| \*\*writes\*\* \| [\d.]+ \|", out, re.M), out


def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    """`gpu_check.py`'s CPU mode: the torchrun launch, FSDP2 on gloo, the SFT and DPO steps with
    the trainer's losses, the fused decoder and the JSON document, at tiny shapes. Its figures
    are only checked to be there and finite, against a made-up --peak-tflops."""
    out = tmp_path / "gpu.json"
    run_bench("gpu_check.py", "--device", "cpu", "--tiny", "--peak-tflops", "1",
              "--out", str(out), timeout=300)  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["environment"]["backend"] == "gloo"
    assert doc["environment"]["peak_source"] == "--peak-tflops"
    for kind in ("sft", "dpo"):
        for model in ("smollm2-135m", "llama-1b"):
            part = doc["parts"][f"{kind}:{model}"]
            assert part["measured"], part
            assert part["tokens_per_s"] > 0 and part["flops_per_token"] > 0
            assert math.isfinite(part["mfu"]) and part["mfu"] > 0
            assert part["mfu"] == pytest.approx(part["tflops_per_device"])  # against 1 TFLOPs
            assert len(part["step_s"]) == 2 and part["peak_memory_gib"][0] > 0
    decoder = doc["parts"]["decoder"]
    assert decoder["measured"], decoder
    assert decoder["decoder"] == "LlamaDecoder" and decoder["tokens_per_s"] > 0
