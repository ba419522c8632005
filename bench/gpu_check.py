"""A GPU check in one command: SFT and DPO step throughput and MFU, the in-process decoder's
tokens/s, and peak GPU memory, with only torch, transformers and peft installed (no vLLM, no
network, no model files).

    python bench/gpu_check.py [--out FILE.json]
    python bench/gpu_check.py --device cpu --tiny --peak-tflops 1 --out FILE.json  # CI smoke

Models are built from configs with random weights (MFU does not depend on their values):
SmolLM2-135M-Instruct's shapes and Llama-3.2-1B's. The training parts run under torchrun
(`python -m torch.distributed.run`, one process per GPU; this script re-launches itself), with
FSDP2 (`fully_shard` per decoder layer, then the root) on NCCL (gloo on CPU). Precision is the
trainer's (`rlhf_trainer.runtime.distributed.shard_model`): float32 parameters and AdamW state, bf16
compute (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`), not pure bf16 weights.

- SFT step: forward, `losses.sft_loss_sum` over every token, backward, grad-norm clip, fused
  AdamW step, at a fixed per-GPU batch x sequence length.
- DPO step: the frozen reference's no-grad forward and the policy's forward + backward over the
  chosen and rejected rows of each pair (two rows, a shared prompt of half the length; the
  trainer's unpacked path), `losses.sequence_logprobs` and `losses.dpo_loss` (sigmoid, beta 0.1),
  clip, AdamW step. The reference is a second FSDP-sharded copy, as `dpo.load_reference` makes.
- Each step is timed after warm-up steps with the device synchronised; the time of a step is the
  slowest rank's, and the figure is the median. tokens/s counts every rank's tokens.
- FLOPs (PaLM, Chowdhery et al. 2022, appendix B; attention counted without the causal half):
  per token, N = weights of every matmul (attention, MLP and the LM head, tied or not; not the
  embedding lookup), L layers, H*Q = query heads x head dim, T = sequence length:
      SFT: 6N + 12 L H Q T           (forward 2N + 4 L H Q T, backward twice that)
      DPO: 8N + 16 L H Q T           (the policy's SFT cost plus the reference's forward)
  MFU = step FLOPs / step time / (GPUs x the GPU's dense bf16 peak).
- Decoder: `rlhf_trainer.rollout.decoders.build_decoder` (the fused `LlamaDecoder` that
  `rollout.engine: trainer` generates with) over the 135M shapes in bf16, greedy, with the same
  prefill / decode calls as `engine.generate_batch` (rollout/engine.py itself imports pydantic
  through config.py, so it is not imported); new tokens / s of a whole batch, the prompt pass
  included.
- Peak memory: `torch.cuda.max_memory_allocated` per rank over each part (models, optimizer and
  activations; the decoder's weights, cache and logits); on CPU the process's peak RSS instead.
`--max-seconds` (default 450) bounds the whole run: a part is skipped, with the reason, once
less time is left than twice the longest part so far.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchlib import median, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))  # this working tree's rlhf_trainer, installed or not

GIB = 2**30
# Dense bf16 TFLOPs by device name, first match wins: (must contain, and also, peak).
PEAK_BF16_TFLOPS = (
    ("H100", "PCIe", 756.0), ("H100", "NVL", 835.0), ("H100", "", 989.0),
    ("H200", "NVL", 835.0), ("H200", "", 989.0), ("A100", "", 312.0), ("L40S", "", 362.0),
)  # fmt: skip
LLAMA = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
# name -> (LlamaConfig fields, per-GPU SFT rows, sequence length); DPO takes rows // 2 pairs.
MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "smollm2-135m": ({**LLAMA, "hidden_size": 576, "intermediate_size": 1536,
                      "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                      "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
                      "rope_theta": 100000.0}, 8, 1024),
    "llama-1b": ({**LLAMA, "hidden_size": 2048, "intermediate_size": 8192,
                  "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                  "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}}, 4, 1024),
}  # fmt: skip
# --tiny: the same code paths at shapes a 2-CPU CI machine runs in seconds.
TINY: dict[str, tuple[dict[str, Any], int, int]] = {
    "smollm2-135m": ({**LLAMA, "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 256}, 2, 32),
    "llama-1b": ({**LLAMA, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
                  "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
                  "vocab_size": 320, "max_position_embeddings": 256}, 2, 32),
}  # fmt: skip
SFT_FLOPS = "6N + 12 L H Q T per token"
DPO_FLOPS = "8N + 16 L H Q T per token (policy 6N + 12LHQT, reference 2N + 4LHQT)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when a GPU is visible")  # fmt: skip
    p.add_argument("--dtype", choices=("bf16", "float32"), default=None,
                   help="compute dtype; default bf16 on cuda, float32 on cpu")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CI smoke)")
    p.add_argument("--nproc", type=int, default=None, help="default: GPUs, or 1 on cpu")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak per device; needed for GPUs not in the table")  # fmt: skip
    p.add_argument("--warmup", type=int, default=None, help="default 3 (tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 5 (tiny: 2)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--prompts", type=int, default=None, help="decoder prompts; default 64")
    p.add_argument("--new-tokens", type=int, default=None, help="decoder; default 128")
    p.add_argument("--max-seconds", type=float, default=450.0, help="the whole run's budget")
    p.add_argument("--out", type=Path, default=None, help="write the JSON document here")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "float32")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps or (2 if args.tiny else 5)
    args.prompts = args.prompts or (4 if args.tiny else 64)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    return args


def peak_tflops(args: argparse.Namespace) -> tuple[float | None, str]:
    """The per-device dense bf16 peak and where it came from."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if args.device == "cpu":
        return None, "no bf16 peak is known for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(0)
    for must, also, peak in PEAK_BF16_TFLOPS:
        if must in name and also in name:
            return peak, f"table ({must} {also})".replace(" )", ")")
    raise SystemExit(f"No bf16 peak is known for {name!r}; pass --peak-tflops (dense bf16, "
                     "per GPU, from the vendor's datasheet)")  # fmt: skip


def llama_config(fields: dict[str, Any], device: str, dtype: str) -> Any:
    from transformers import LlamaConfig

    # On CPU in bf16 the trainer swaps sdpa for eager attention (`cpu_bf16_attention`).
    attn = "eager" if device == "cpu" and dtype == "bf16" else "sdpa"
    return LlamaConfig(**{**fields, "attn_implementation": attn})


def new_llama(config: Any) -> nn.Module:
    """A random-init LlamaForCausalLM on the current default device."""
    from transformers import LlamaForCausalLM

    model: nn.Module = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    return model


def forward_flops_per_token(config: Any, matmul_params: int, seq: int) -> float:
    """2N + 4 L H Q T: the matmuls' weights once each (multiply and add), and per layer and
    query head the T-key scores and the T-value sum over a Q-wide head."""
    heads = config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return float(2.0 * matmul_params + 4.0 * heads * seq)


# -- the torchrun worker: SFT and DPO steps under FSDP2 -----------------------------------------


@dataclass(frozen=True)
class Ctx:
    device: torch.device
    rank: int
    world: int
    bf16: bool

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def init_worker(args: argparse.Namespace) -> Ctx:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        # A rank that failed a part must not leave the others waiting 10 minutes in a collective.
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=180))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    return Ctx(device, dist.get_rank(), dist.get_world_size(), args.dtype == "bf16")


def build_sharded(config: Any, ctx: Ctx, train: bool) -> nn.Module:
    """A random-init LlamaForCausalLM on the rank's device, float32, FSDP2-sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)  # every rank, and the DPO reference, starts from the same weights
    with ctx.device:
        model = new_llama(config)
    model.train(train)
    model.requires_grad_(train)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if ctx.bf16 else MixedPrecisionPolicy())  # fmt: skip
    for layer in model.model.layers:  # type: ignore[union-attr]
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def matmul_params(model: nn.Module) -> int:
    """Weights of every nn.Linear, the LM head included (tied or not); before sharding."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def clip(model: nn.Module) -> None:
    """As `loop.grad_norm_and_clip`: the global norm read back to the host every step (the
    trainer checks it is finite before stepping), so the step pays that sync here too."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not torch.isfinite(full).item():
        raise FloatingPointError(f"the gradient norm is {float(full)}")


def sft_part(config: Any, rows: int, seq: int, ctx: Ctx) -> tuple[Callable[[], None], int]:
    """The step, and its rows x tokens; every token is a target."""
    from rlhf_trainer.algos.losses import count_targets, sft_loss_sum

    model = build_sharded(config, ctx, train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (rows, seq), device=ctx.device)
    targets = float(count_targets(ids)) * ctx.world  # the global batch's, as the trainer divides

    def step() -> None:
        loss = sft_loss_sum(model(input_ids=ids).logits, ids) / targets
        loss.backward()  # type: ignore[no-untyped-call]
        clip(model)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, rows * seq


def dpo_part(config: Any, pairs: int, seq: int, ctx: Ctx) -> tuple[Callable[[], None], int]:
    """The step over `pairs` pairs: rows 0..pairs-1 chosen, the rest rejected (as the trainer's
    `chunk(2)` splits them), sharing a prompt of seq // 2 tokens that is not scored."""
    from rlhf_trainer.algos.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs

    policy = build_sharded(config, ctx, train=True)
    reference = build_sharded(config, ctx, train=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    ids = torch.randint(0, config.vocab_size, (2 * pairs, seq), device=ctx.device)
    ids[pairs:, : seq // 2] = ids[:pairs, : seq // 2]
    labels = ids.clone()
    labels[:, : seq // 2] = IGNORE_INDEX

    def step() -> None:
        with torch.no_grad():
            ref, _ = sequence_logprobs(reference(input_ids=ids).logits, labels)
        logp, _ = sequence_logprobs(policy(input_ids=ids).logits, labels)
        (chosen, rejected), (ref_c, ref_r) = logp.chunk(2), ref.chunk(2)
        loss = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1).losses.sum() / (
            pairs * ctx.world)  # fmt: skip
        loss.backward()  # type: ignore[no-untyped-call]
        clip(policy)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, 2 * pairs * seq


def timed(step: Callable[[], None], warmup: int, steps: int, ctx: Ctx) -> list[float]:
    """Seconds per timed step, each the slowest rank's."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        ctx.sync()
        start = time.perf_counter()
        step()
        ctx.sync()
        times.append(time.perf_counter() - start)
    out = torch.tensor(times, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return [float(t) for t in out.tolist()]


def peak_memory_gib(ctx: Ctx) -> tuple[str, list[float]]:
    """Every rank's peak: allocated by torch on CUDA, the process's RSS on CPU."""
    if ctx.device.type == "cuda":
        kind, mine = "max_memory_allocated", torch.cuda.max_memory_allocated(ctx.device) / GIB
    else:  # ru_maxrss is in KiB on Linux
        kind, mine = "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    local = torch.tensor([mine], dtype=torch.float64, device=ctx.device)
    every = [torch.zeros_like(local) for _ in range(ctx.world)]
    dist.all_gather(every, local)
    return kind, [round(float(t.item()), 3) for t in every]


def run_part(kind: str, name: str, args: argparse.Namespace, ctx: Ctx) -> dict[str, Any]:
    fields, rows, seq = (TINY if args.tiny else MODELS)[name]
    config = llama_config(fields, args.device, args.dtype)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    with torch.device("meta"):  # counted on an unsharded copy that holds no memory
        shape_model = new_llama(config)
    n = matmul_params(shape_model)
    params = sum(p.numel() for p in shape_model.parameters())
    del shape_model
    forward = forward_flops_per_token(config, n, seq)
    if kind == "sft":
        step, tokens = sft_part(config, rows, seq, ctx)
        per_token = 3 * forward  # the backward pass costs twice the forward
    else:
        step, tokens = dpo_part(config, rows // 2, seq, ctx)
        per_token = 4 * forward  # the policy's forward + backward (3x), the reference's (1x)
    times = timed(step, args.warmup, args.steps, ctx)
    seconds = median(times)
    achieved = per_token * tokens / seconds  # FLOP/s of one rank (every rank has `tokens`)
    peak, _ = peak_tflops(args)
    mem_kind, mem = peak_memory_gib(ctx)
    return {
        "measured": True, "model": name, "params": params, "matmul_params": n,
        "rows_per_rank": tokens // seq, "seq_len": seq, "tokens_per_step": tokens * ctx.world,
        "step_s": times, "step_s_median": seconds,
        "tokens_per_s": tokens * ctx.world / seconds,
        "tflops_per_device": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "flops_formula": SFT_FLOPS if kind == "sft" else DPO_FLOPS,
        "flops_per_token": per_token, "peak_memory_kind": mem_kind, "peak_memory_gib": mem,
    }  # fmt: skip


def skip_reason(stop_at: float, longest: float, ctx: Ctx) -> str | None:
    """Rank 0 decides for every rank, so that no rank starts a part the others skip."""
    left, need = stop_at - time.time(), max(20.0, 2 * longest)
    skip = torch.tensor([1 if left < need else 0], device=ctx.device)
    dist.broadcast(skip, src=0)
    if not int(skip.item()):
        return None
    return (f"skipped: {left:.0f} s of --max-seconds left, under the {need:.0f} s a part is "
            "given (20 s, or twice the longest part so far)")  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    ctx = init_worker(args)
    results: dict[str, Any] = {}
    longest = 0.0
    for name in args.models:
        for kind in ("sft", "dpo"):
            part = f"{kind}:{name}"
            reason = skip_reason(args.stop_at, longest, ctx)
            start = time.monotonic()
            if reason is None:
                try:
                    results[part] = run_part(kind, name, args, ctx)
                except Exception as exc:  # one part's failure (OOM) leaves the others measured
                    traceback.print_exc()
                    reason = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            if reason is not None:
                results[part] = {"measured": False, "reason": reason}
            elapsed = time.monotonic() - start
            longest = max(longest, elapsed)
            results[part]["elapsed_s"] = round(elapsed, 2)
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            if ctx.rank == 0:
                print(f"Finished {part} in {elapsed:.1f} s", flush=True)
                # Rewritten after every part, so that a later part that hangs loses only itself.
                (args.worker / "parts.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# -- the decoder, in the launching process --------------------------------------------------------


def greedy_generate(decoder: Any, ids: torch.Tensor, real: torch.Tensor, new: int) -> None:
    """`engine.generate_batch`'s prefill / decode calls, greedy, no stop token (random weights
    would stop at random, and the batch would end early)."""
    from rlhf_trainer.rollout.decoders import prompt_positions

    width = ids.size(1)
    logits = decoder.prefill(ids, real, width + new)
    visible = torch.ones((ids.size(0), width + new), dtype=torch.bool, device=ids.device)
    visible[:, :width] = real
    positions = prompt_positions(real)[:, -1] + 1
    for t in range(new):
        tokens = logits.argmax(dim=-1)
        if t + 1 == new:
            break
        logits = decoder.decode(tokens, positions, visible[:, : width + t + 1])
        positions = positions + 1


def decoder_part(args: argparse.Namespace) -> dict[str, Any]:
    from rlhf_trainer.rollout.decoders import LlamaDecoder, build_decoder

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    fields = (TINY if args.tiny else MODELS)["smollm2-135m"][0]
    config = llama_config(fields, args.device, args.dtype)
    torch.manual_seed(0)
    with device:
        model = new_llama(config)
    decoder = build_decoder(config, dict(model.state_dict()), device, dtype)
    del model  # the decoder holds its own bf16 copies; the peak below is the decoder's alone
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prompt = 8 if args.tiny else 128
    lengths = torch.randint(prompt // 2, prompt + 1, (args.prompts,)).tolist()
    ids = torch.randint(4, config.vocab_size, (args.prompts, prompt), device=device)
    # Left-padded, as engine.left_padded lays prompts out.
    pad = prompt - torch.tensor(lengths, device=device)
    real = torch.arange(prompt, device=device) >= pad[:, None]
    ctx = Ctx(device, 0, 1, dtype == torch.bfloat16)
    greedy_generate(decoder, ids, real, min(4, args.new_tokens))  # warm-up
    times = []
    for _ in range(3):
        ctx.sync()
        start = time.perf_counter()
        greedy_generate(decoder, ids, real, args.new_tokens)
        ctx.sync()
        times.append(time.perf_counter() - start)
    seconds = median(times)
    return {
        "measured": True, "decoder": type(decoder).__name__,
        "fused": isinstance(decoder, LlamaDecoder), "dtype": str(dtype).removeprefix("torch."),
        "prompts": args.prompts, "prompt_tokens": f"{prompt // 2}..{prompt}, left-padded",
        "new_tokens": args.new_tokens, "sampling": "greedy, no stop token",
        "generate_s": times, "generate_s_median": seconds,
        "tokens_per_s": args.prompts * args.new_tokens / seconds,
        "peak_memory_gib": [torch.cuda.max_memory_allocated(device) / GIB]
        if device.type == "cuda" else None,
    }  # fmt: skip


# -- the launcher -------------------------------------------------------------------------------


def launch_workers(args: argparse.Namespace, nproc: int, stop_at: float) -> dict[str, Any]:
    """Runs this script's worker under torchrun; the parts it finished, or why it did not."""
    with tempfile.TemporaryDirectory() as tmp:
        # The settings go in a file: torchrun's own parser would claim any script option that
        # abbreviates one of its own (`--nproc` is ambiguous to it even after the script).
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
        (Path(tmp) / "settings.json").write_text(json.dumps({**settings, "stop_at": stop_at}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), str(Path(__file__).resolve()),
               "--worker", tmp]  # fmt: skip
        print("Launched " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:  # a part in flight at the deadline gets 2 minutes more
            code: int | str = proc.wait(timeout=max(stop_at - time.time(), 0) + 120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "killed at the --max-seconds limit"
        out = Path(tmp) / "parts.json"
        parts: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    for name in args.models:
        for kind in ("sft", "dpo"):
            reason = f"the torchrun workers ended (exit {code}) before this part"
            parts.setdefault(f"{kind}:{name}", {"measured": False, "reason": reason})
    return parts


def environment(args: argparse.Namespace, nproc: int) -> dict[str, Any]:
    import transformers

    peak, source = peak_tflops(args)
    cuda = args.device == "cuda"
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "device_count": nproc,
        "backend": "nccl" if cuda else "gloo", "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "peak_tflops_bf16": peak, "peak_source": source,
        "precision": ("float32 params and AdamW state, bf16 compute, float32 gradient reduce "
                      "(FSDP2 MixedPrecisionPolicy)") if args.dtype == "bf16"
        else "float32 throughout",
        "flops": {"sft": SFT_FLOPS, "dpo": DPO_FLOPS, "N": "weights of every matmul incl. the "
                  "LM head", "T": "sequence length; attention counted without the causal half"},
        "tiny": args.tiny, "warmup_steps": args.warmup, "timed_steps": args.steps,
    }  # fmt: skip


def report(doc: dict[str, Any]) -> str:
    """The human-readable summary: one row per training part, then the decoder."""
    rows, notes = [], []
    for part, r in doc["parts"].items():
        if not r["measured"]:
            notes.append(f"{part}: {r['reason']}")
        elif part != "decoder":
            mfu = f"{100 * r['mfu']:.3g}%" if r["mfu"] is not None else "n/a"
            rows.append([part, f"{r['rows_per_rank']} x {r['seq_len']}", r["step_s_median"],
                         r["tokens_per_s"], r["tflops_per_device"], mfu,
                         max(r["peak_memory_gib"]), r["elapsed_s"]])  # fmt: skip
    env = doc["environment"]
    head = (
        f"{env['device']} x{env['device_count']}, torch {env['torch']}, "
        f"peak {env['peak_tflops_bf16'] or 'n/a'} TFLOPs ({env['peak_source']}); {env['precision']}"
    )
    out = [head, table(["part", "rows x T per rank", "step s", "tokens/s", "TFLOP/s per dev",
                        "MFU", "peak mem GiB (max rank)", "part s"], rows)]  # fmt: skip
    dec = doc["parts"].get("decoder", {})
    if dec.get("measured"):
        out.append(f"decoder ({dec['decoder']}, {dec['dtype']}): {dec['prompts']} prompts x "
                   f"{dec['new_tokens']} new tokens in {dec['generate_s_median']:.2f} s = "
                   f"{dec['tokens_per_s']:.0f} tokens/s")  # fmt: skip
    out += [f"not measured: {n}" for n in notes]
    out.append(f"FLOPs per token: SFT {SFT_FLOPS}; DPO {DPO_FLOPS}; total {doc['elapsed_s']} s")
    return "\n".join(out)


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        settings = json.loads((args.worker / "settings.json").read_text())
        worker(argparse.Namespace(**settings, worker=args.worker))
        return
    start = time.time()
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 1)
    doc: dict[str, Any] = {"environment": environment(args, nproc)}
    # The decoder runs after the workers; leave it its share of the budget.
    stop_at = start + args.max_seconds - (5 if args.tiny else 45)
    doc["parts"] = launch_workers(args, nproc, stop_at)
    left = start + args.max_seconds - time.time()
    if left < (5 if args.tiny else 30):
        reason = f"skipped: {left:.0f} s of --max-seconds left"
        doc["parts"]["decoder"] = {"measured": False, "reason": reason}
    else:
        began = time.monotonic()
        try:
            doc["parts"]["decoder"] = decoder_part(args)
        except Exception as exc:  # an import that needs pydantic, an OOM: say so, keep the rest
            traceback.print_exc()
            reason = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            doc["parts"]["decoder"] = {"measured": False, "reason": reason}
        doc["parts"]["decoder"]["elapsed_s"] = round(time.monotonic() - began, 2)
    doc["elapsed_s"] = round(time.time() - start, 1)
    print(report(doc))
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
