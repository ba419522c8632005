"""Process group setup (torchrun or a plain process), rank-0 logging and FSDP2 sharding."""

from __future__ import annotations

import datetime
import logging
import os
import platform
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from rlhf_trainer.config import (
    CPU_BF16_ENV,
    CpuBf16,
    cpu_bf16_from_cpuinfo,
    read_cpuinfo,
    resolve_bf16,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    bf16: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(bf16: bool | None, timeout_minutes: int = 30) -> DistContext:
    """Join torchrun's group (env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), or make a 1-rank gloo
    group for a plain process. NCCL with one GPU per local rank when CUDA is present, else gloo.
    `bf16` (None: on with a GPU) goes through `config.resolve_bf16`: on a CPU without native
    bf16 a requested bf16 falls back to float32, and rank 0 warns why and how to keep it."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if cuda else None)
        else:
            # A plain process: a 1-rank group on an in-memory store, no port needed.
            store = dist.HashStore()  # type: ignore[attr-defined]
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    choice = resolve_bf16(bf16, cuda, this_cpu_bf16(), os.environ.get(CPU_BF16_ENV))
    use_bf16 = choice.bf16
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, use_bf16)
    if choice.fallback is not None and ctx.is_main:
        log.warning("%s", choice.fallback)
    log.info(
        "Joined %s process group: world size %d, device %s, bf16 %s",
        backend,
        ctx.world_size,
        device.type,
        use_bf16,
    )
    return ctx


# x86 names that platform.machine() gives: AVX512-BF16 and AMX come only with AVX-512.
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})


def cpu_bf16_from_capability(capability: str, machine: str) -> CpuBf16:
    """torch's CPU dispatch level, for where /proc/cpuinfo says nothing (macOS, Windows): on
    x86, DEFAULT or AVX2 means no AVX-512, so no native bf16; AVX512 leaves it open."""
    if machine.lower() in X86_MACHINES and capability in ("DEFAULT", "AVX2"):
        return CpuBf16(False, f"{capability} only: torch CPU capability {capability}")
    return CpuBf16(None, f"torch CPU capability {capability}")


def this_cpu_bf16() -> CpuBf16:
    """This machine's bf16 facts: /proc/cpuinfo's flags, else torch's CPU capability."""
    cpu = cpu_bf16_from_cpuinfo(read_cpuinfo())
    if cpu.native is None:
        capability = torch.backends.cpu.get_cpu_capability()
        cpu = cpu_bf16_from_capability(capability, platform.machine())
    return cpu


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks, in float64 so sums of token counts stay exact. One rank
    has nothing to sum with (and its updates may then run on two threads at once)."""
    if dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def broadcast_object(obj: object) -> object:
    """Rank 0's value of `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, found by the model's `_no_split_modules` class names."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        inner = getattr(model, "model", None)
        found = getattr(inner, "layers", None)
        layers = list(found) if isinstance(found, nn.ModuleList) else []
    return layers


def cpu_bf16_attention(model: nn.Module) -> None:
    """A Hugging Face model on CPU that will compute in bf16: `eager` attention (two bf16
    matmuls and a float32 softmax) in place of `sdpa`, whose CPU path is a flash-attention
    kernel that runs the packed rows' masked attention at a fraction of the bf16 GEMM rate. On
    the 20m bench model a PPO batch's forward + backward took 1.60 s instead of 1.85 s; in
    float32 sdpa is as fast (3.06 s, eager 3.15 s), so it stays. Eager keeps each row's (heads,
    L, L) attention weights for the backward pass, which CPU-sized models and lengths afford."""
    from transformers import PreTrainedModel

    if any(p.device.type != "cpu" for p in model.parameters()):
        return
    # The outermost Hugging Face model: setting it sets its sub-models' too.
    top = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if top is not None and top.config._attn_implementation == "sdpa":
        top.set_attn_implementation("eager")


def shard_model(model: nn.Module, bf16: bool) -> nn.Module:
    """FSDP2: shard each decoder layer, then the root (embeddings, norm, head). Parameters stay
    float32; with bf16 the forward and backward compute in bf16 and gradients reduce in float32.

    One process in float32 has nothing to shard and no precision policy to apply: the model stays
    a plain module, as TRL and accelerate leave it, because FSDP2 would route every op through
    DTensor dispatch for nothing (docs/DESIGN.md, "Trainer jobs"). Everything
    downstream (checkpoints, clipping, weight sync) takes plain and sharded models alike, and
    checkpoints reshard between the two.

    On CPU in bf16 the attention becomes `eager` where it was `sdpa` (`cpu_bf16_attention`)."""
    if not bf16 and dist.is_initialized() and dist.get_world_size() == 1:
        return model
    if bf16:
        cpu_bf16_attention(model)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    layers = decoder_layers(model)
    if not layers:
        log.warning("Found no decoder layers in %s; sharded only the root", type(model).__name__)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
