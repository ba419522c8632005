"""This machine's matmul limit for SmolLM2-135M-Instruct's shapes, and the share of it that each
of our training phases reaches.

    python bench/roofline.py [--repeats 3] [--steps 8] [--warmup 2] [--online-raw FILE]
                             [--precisions float32 bf16] [--doc FILE]

1. **The limit.** Every matmul of a training step at the phase's tokens per step M is timed on
   its own with `torch.mm` (median of a few calls after a warm-up): for each linear layer of the
   model (q, k, v, o, gate, up, down of each decoder layer, and the tied LM head) the forward
   (M, in) @ (in, out) and the backward's two, (M, out) @ (out, in) for the input's gradient
   and (in, M) @ (M, out) for the weight's. Their FLOPs over their summed time is the rate this
   machine reaches on exactly those shapes, in float32 and in bf16.
2. **The share.** A phase's FLOPs are those of the passes its algorithm needs, at 2 FLOPs per
   multiply-add: 6N per trained token (forward and backward) and 2N per token of a forward-only
   pass (DPO's reference), N the weights of every matmul (the LM head counted once, it is the
   tied embedding), plus attention's 12·L·d·S per trained token (4·L·d·S forward-only; S the
   mean sequence length, the causal half counted too, PaLM's convention). The share is the time
   those FLOPs take at the measured rate over the phase's measured time.
   - SFT and DPO: `bench/ours.py` on SmolLM2 with chat data (the same runs as trainers.py),
     each step's time and tokens. SFT's tokens whose next token is not scored (the prompt's,
     and the last) count without the LM head, which ours runs only at the scored positions
     (`losses.sft_scored`). DPO's tokens are each pair's two sequences, prompt included, as TRL
     computes them (ours holds the prompt once in a packed row and runs the LM head only at the
     scored positions, so it does less work than that count says).
   - GRPO's training phase (`--online-raw`, bench/online.py's `--raw` file): `train_s`, and the
     tokens its packed rows hold (each group's prompt once, every response: from `train_tokens`,
     which counts each sample's prompt, the responses and the prompts per step), one optimizer
     step, no reference (β = 0). Its prompt tokens count without the LM head: the loss uses no
     logits there, and ours computes none (`packed_logits(keep=)`).

Writes the `bench:roofline` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    DOC,
    build_models,
    environment,
    load_note,
    median,
    run_json,
    table,
    write_section,
)
from trainers import DATA

BENCH = Path(__file__).resolve().parent
DTYPES = ("float32", "bf16")


@dataclass(frozen=True)
class Shapes:
    """A Llama's matmul shapes, from its config.json."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, model: Path) -> Shapes:
        c = json.loads((model / "config.json").read_text())
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                   c.get("num_key_value_heads", c["num_attention_heads"]), head_dim,
                   c["num_hidden_layers"], c["vocab_size"])  # fmt: skip

    def linears(self) -> list[tuple[int, int, int]]:
        """(in, out, how many) of each linear layer, the LM head last."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, self.intermediate),
                     (h, self.intermediate), (self.intermediate, h)]  # fmt: skip
        return [(i, o, self.layers) for i, o in per_layer] + [(h, self.vocab, 1)]

    @property
    def matmul_weights(self) -> int:
        return sum(i * o * n for i, o, n in self.linears())

    def flops_per_token(self, seq_len: float, backward: bool) -> float:
        """A pass's FLOPs per token: 2N forward (+4N backward), attention's QK^T and AV."""
        attention = 4 * self.layers * self.heads * self.head_dim * seq_len
        return (3 if backward else 1) * (2 * self.matmul_weights + attention)


def time_mm(m: int, k: int, n: int, dtype: Any, calls: int) -> float:
    """Median seconds of (m, k) @ (k, n) in `dtype`, after one warm-up call."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_rates(shapes: Shapes, tokens: int, dtype: str, calls: int) -> dict[str, float]:
    """FLOP/s of the step's forward matmuls and of its forward + backward ones, at M = tokens."""
    import torch

    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    forward = backward = 0.0
    flops = 0.0
    for i, o, count in shapes.linears():
        forward += count * time_mm(tokens, i, o, torch_dtype, calls)
        backward += count * (time_mm(tokens, o, i, torch_dtype, calls)
                             + time_mm(i, tokens, o, torch_dtype, calls))  # fmt: skip
        flops += count * 2 * tokens * i * o
    return {"forward": flops / forward, "train": 3 * flops / (forward + backward)}


@dataclass(frozen=True)
class Phase:
    """A measured phase: seconds and tokens per counted step, the mean sequence length, and the
    passes over those tokens (trained: forward + backward; forward-only, e.g. a reference)."""

    name: str
    seconds: float
    tokens: float
    seq_len: float
    trained: int = 1
    forward_only: int = 0
    # tokens per step whose logits the phase never uses, so the LM head need not run there
    # (GRPO's prompts: `packed_logits(keep=)` runs it at the response positions only)
    headless: float = 0.0

    def share(self, shapes: Shapes, rates: dict[str, float]) -> tuple[float, float]:
        """(achieved FLOP/s, share of the measured matmul rate)."""
        head = 6 * shapes.hidden * shapes.vocab * self.headless  # forward and backward
        train = self.trained * self.tokens * shapes.flops_per_token(self.seq_len, True) - head
        ref = self.forward_only * self.tokens * shapes.flops_per_token(self.seq_len, False)
        ideal = train / rates["train"] + ref / rates["forward"]
        return (train + ref) / self.seconds, ideal / self.seconds


def offline_phase(stage: str, model: Path, root: Path, args: argparse.Namespace) -> Phase:
    """Our sft or dpo stage on the model's data (SmolLM2: chat), `args.repeats` runs: median
    step time and tokens."""
    seconds, tokens, scored = [], [], []
    for r in range(args.repeats):
        argv = [sys.executable, str(BENCH / "ours.py"), stage, "--model", str(model),
                "--data", DATA[args.model], "--workdir", str(root / f"{stage}-{r}"),
                "--steps", str(args.steps), "--batch", str(args.batch),
                "--max-length", str(args.max_length)]  # fmt: skip
        result = run_json(argv)
        seconds += result["seconds"][args.warmup :]
        tokens += result["tokens"][args.warmup :]
        scored += result["trained_tokens"][args.warmup :]
        print(f"  {stage} run {r + 1}: {median(result['seconds'][args.warmup :]):.2f} s/step",
              file=sys.stderr, flush=True)  # fmt: skip
    rows = args.batch * (2 if stage == "dpo" else 1)  # DPO: a pair's two sequences
    mean_tokens = statistics.mean(tokens)
    passes = {"sft": (1, 0), "dpo": (1, 1)}[stage]  # DPO: the reference's forward, every step
    # SFT runs its output layer only where the next token is scored (`losses.sft_scored`)
    headless = mean_tokens - statistics.mean(scored) if stage == "sft" else 0.0
    return Phase(stage.upper(), median(seconds), mean_tokens, mean_tokens / rows, *passes,
                 headless=headless)  # fmt: skip


def online_phase(raw_file: Path, warmup: int, prompts: int) -> Phase | None:
    """GRPO's training phase from bench/online.py's raw figures (ours, `engine: trainer`). Its
    tokens are those computed: a group's prompt once (packed rows hold it once), each sample's
    response; `prompts` per step where the raw file does not say."""
    raw = json.loads(raw_file.read_text())
    runs = next((v for k, v in raw.items() if k.startswith("trainer-grpo smollm2")), None)
    if not runs:
        return None
    seconds, tokens, lengths, headless = [], [], [], []
    for run in runs:
        shared = run.get("train_prompts", [float(prompts)] * len(run["train_s"]))
        steps = zip(run["train_s"], run["train_tokens"], run["train_rows"], shared, run["tokens"],
                    strict=True)  # fmt: skip
        for s, t, r, g, gen in list(steps)[warmup:]:
            seconds.append(s)
            tokens.append(gen + g * (t - gen) / r)  # (t - gen) / r: a sample's prompt
            lengths.append(t / r)
            headless.append(g * ((t - gen) / r - 1))  # a prompt's last token predicts
    return Phase("GRPO (training phase)", median(seconds), statistics.mean(tokens),
                 statistics.mean(lengths), headless=statistics.mean(headless))  # fmt: skip


TEXT = """\
Machine: {machine}. {load}.

The limit: each matmul of a training step of SmolLM2-135M-Instruct (30 layers of q, k, v, o, \
gate, up and down, and the tied LM head 576 x 49152) at the phase's tokens per step, timed on \
its own with `torch.mm` (forward, and the backward's two matmuls per layer), their FLOPs over \
their summed time. The share: the FLOPs of the passes each phase needs (6N per trained token, \
2N per token of a forward-only pass, N = {n:.1f}M matmul weights, plus attention; SFT's \
tokens whose next token is not scored and GRPO's prompt tokens without the LM head, whose \
logits neither uses nor computes) at that rate, over the phase's \
measured step time (median over {repeats} runs of {steps} steps, the first \
{warmup} not counted; batch {batch}, chat data, float32, 1 process). DPO's tokens are each \
pair's two full sequences (TRL's count; ours packs the prompt once); GRPO's are what its packed \
rows hold, each group's prompt once and every response, from `bench/online.py --raw`.

Command: `{command}`

Matmul rate for these shapes, by precision (GFLOP/s; M = tokens per step):

{rates}

Share of the float32 rate each phase reaches:

{phases}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per matmul shape")
    parser.add_argument("--precisions", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--online-raw", type=Path, help="bench/online.py --raw output (GRPO)")
    parser.add_argument("--online-prompts", type=int, default=4,
                        help="GRPO prompts per step where the raw file lacks them")  # fmt: skip
    parser.add_argument(
        "--model",
        choices=["smollm2", "tiny", "20m"],
        default="smollm2",
        help="smollm2 is the model measured; tiny only for the smoke test",
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="where the section is written")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rlhf-roofline-") as tmp:
        model = build_models(Path(tmp), [args.model])[args.model]
        shapes = Shapes.of(model)
        phases = [offline_phase(stage, model, Path(tmp), args) for stage in ("sft", "dpo")]
    grpo = args.online_raw and online_phase(args.online_raw, args.warmup, args.online_prompts)
    if grpo:
        phases.append(grpo)
    rate_rows, phase_rows = [], []
    for n, phase in enumerate(phases):
        # bf16 at the first phase's M only: on a CPU without native bf16 its matmuls are slow
        rates = {dtype: matmul_rates(shapes, round(phase.tokens), dtype, args.calls)
                 for dtype in (args.precisions if n == 0 else args.precisions[:1])}  # fmt: skip
        rate_rows += [[phase.name, round(phase.tokens), dtype, r["forward"] / 1e9, r["train"] / 1e9]
                      for dtype, r in rates.items()]  # fmt: skip
        achieved, share = phase.share(shapes, rates[args.precisions[0]])
        phase_rows.append([phase.name, phase.seconds, round(phase.tokens), round(phase.seq_len),
                           achieved / 1e9, f"{share:.0%}"])  # fmt: skip
    command = (f"python bench/roofline.py --repeats {args.repeats} --steps {args.steps} "
               f"--warmup {args.warmup} --batch {args.batch}"
               + (f" --online-raw {args.online_raw.name}" if args.online_raw else ""))  # fmt: skip
    body = TEXT.format(
        machine=environment(), load=load_note(load), n=shapes.matmul_weights / 1e6,
        repeats=args.repeats, steps=args.steps, warmup=args.warmup, batch=args.batch,
        command=command,
        rates=table(["phase", "M", "precision", "forward GFLOP/s", "forward + backward GFLOP/s"],
                    rate_rows),
        phases=table(["phase", "s/step", "tokens/step", "mean seq len", "achieved GFLOP/s",
                      f"share of {args.precisions[0]} rate"], phase_rows),
    )  # fmt: skip
    write_section("roofline", "Roofline: our training phases against the matmul rate", body,
                  args.doc)  # fmt: skip
    print(body)


if __name__ == "__main__":
    main()
