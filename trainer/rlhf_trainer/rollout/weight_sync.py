"""Weight sync, trainer to rollout servers, behind one interface with two backends.

- `disk` (default; works everywhere, CPU included): rank 0 writes a safetensors snapshot of the
  gathered weights under `<output_dir>/weights/step-N/`, then on every replica (concurrently):
  `POST /pause`, `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path":
  ...}}`, `POST /reset_prefix_cache`, `POST /resume` (vLLM's dev routes:
  VLLM_SERVER_DEV_MODE=1). Only the newest snapshot is kept.
- `nccl` (GPU clusters): vLLM's weight-transfer engine, in `nccl_sync.py`.
- LoRA stages (`LoraWeightSync`, on disk): only the adapters, which servers load at runtime.

Every sync is collective (each rank takes part in gathering the FSDP-sharded weights); only
rank 0 talks to the servers. After each sync, the parity probe (`parity.Syncer`) checks that
the servers really serve the new weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import httpx
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rlhf_trainer.config import RolloutTarget
from rlhf_trainer.rollout.completions import tls_context
from rlhf_trainer.runtime.distributed import DistContext, barrier
from rlhf_trainer.runtime.metrics import SyncBackend

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "model.safetensors"


class WeightSyncError(RuntimeError):
    """The servers did not take the new weights (or a probe shows they serve other ones)."""


class ServerControl:
    """Rank 0's control-plane calls to the replicas: POSTs with a timeout and bounded retries
    on connection errors (the routes are idempotent)."""

    def __init__(self, target: RolloutTarget, transport: httpx.BaseTransport | None = None):
        self.urls = [u.rstrip("/") for u in target.urls]
        self.retries = target.max_retries
        self.http = httpx.Client(
            timeout=httpx.Timeout(target.timeout_seconds), transport=transport, verify=tls_context()
        )

    def post(self, url: str, route: str, body: dict[str, Any] | None = None) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                response = self.http.post(f"{url}{route}", json=body)
            except httpx.HTTPError as err:
                last = repr(err)
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code != 200:
                missing = response.status_code == 404
                hint = (
                    "; the server needs VLLM_SERVER_DEV_MODE=1 (LoRA routes also "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and a vLLM that has the route "
                    "(0.32 is what this project tests)"
                    if missing
                    else ""
                )
                raise WeightSyncError(
                    f"{url}{route}: HTTP {response.status_code}: {response.text[:300]}{hint}"
                )
            try:
                return response.json() if response.content else None
            except ValueError:  # some routes answer plain text ("Success: ...")
                return response.text
        raise WeightSyncError(f"{url}{route}: failed after {self.retries} retries: {last}")

    def get(self, url: str, route: str) -> Any:
        response = self.http.get(f"{url}{route}")
        return response.json() if response.status_code == 200 else None

    def each(self, call: Callable[[str], Any]) -> list[Any]:
        """`call(url)` on every replica concurrently; the first error is raised."""
        with ThreadPoolExecutor(max_workers=max(len(self.urls), 1)) as pool:
            return list(pool.map(call, self.urls))

    def close(self) -> None:
        self.http.close()


class WeightSync(Protocol):
    backend: SyncBackend

    def sync(self, model: nn.Module, step: int) -> None:
        """Push the model's current weights to every replica. Collective."""
        ...

    def close(self) -> None: ...


def full_state_on_rank0(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Collective: the gathered full state dict on rank 0 (CPU, `dtype`); {} elsewhere. Tied
    output embeddings are left out, as vLLM ties them itself."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.to(dtype).contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


class DiskWeightSync:
    """`disk`: a safetensors snapshot on the shared workspace, reloaded by every replica."""

    backend: SyncBackend = "disk"

    def __init__(
        self,
        target: RolloutTarget,
        snapshot_root: Path,
        ctx: DistContext,
        dtype: torch.dtype,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.root, self.ctx, self.dtype = snapshot_root, ctx, dtype
        self.control = ServerControl(target, transport) if ctx.is_main else None

    def write_snapshot(self, state: dict[str, torch.Tensor], step: int) -> Path:
        """Rank 0: write `weights/step-N/model.safetensors` atomically (temp folder, rename)."""
        from safetensors.torch import save_file

        final, tmp = self.root / f"step-{step}", self.root / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / SNAPSHOT_FILE), metadata={"format": "pt"})
        (tmp / SNAPSHOT_FILE).chmod(0o644)  # servers may run as another user
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final

    def swap(self, route: str, body: dict[str, Any]) -> None:
        """Rank 0, on every replica at once: pause, `POST route` with `body` (the new weights),
        drop the prefix cache (its KV came from the old weights), resume."""
        control = self.control
        assert control is not None

        def one(url: str) -> None:
            control.post(url, "/pause")
            control.post(url, route, body)
            control.post(url, "/reset_prefix_cache")
            control.post(url, "/resume")

        control.each(one)

    def reload(self, path: Path) -> None:
        """Rank 0: every replica reloads its weights from the snapshot folder `path`."""
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(path.resolve())}}
        self.swap("/collective_rpc", body)

    def sync(self, model: nn.Module, step: int) -> None:
        state = full_state_on_rank0(model, self.dtype)
        if self.ctx.is_main:
            path = self.write_snapshot(state, step)
            self.reload(path)
            self.prune(path)
        barrier()

    def prune(self, keep: Path) -> None:
        for old in self.root.iterdir():
            if old != keep and old.name.startswith("step-"):
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()


ADAPTER_FILE = "adapter_model.safetensors"


def adapter_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Collective: the LoRA adapters (the trainable parameters of a PEFT model) in full, keyed
    as PEFT saves them (`...q_proj.lora_A.weight`, the adapter name left out)."""
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name.replace(".default.", ".")] = full.detach().to("cpu", dtype).contiguous()
    return out


class LoraWeightSync(DiskWeightSync):
    """LoRA stages: only the adapters go to the servers, as a PEFT adapter folder on the
    workspace that every replica loads at runtime, replacing the one it had: `POST /pause`,
    `POST /v1/load_lora_adapter` (`load_inplace`), `POST /reset_prefix_cache`, `POST /resume`.
    Servers keep the base weights they started with (`--enable-lora`,
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), and requests ask for the adapter by name."""

    def __init__(
        self,
        target: RolloutTarget,
        snapshot_root: Path,
        ctx: DistContext,
        dtype: torch.dtype,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(target, snapshot_root, ctx, dtype, transport)
        if target.lora_adapter is None:
            raise ValueError("LoraWeightSync needs rollout.loraAdapter")
        self.adapter = target.lora_adapter

    def write_adapter(self, model: nn.Module, tensors: dict[str, torch.Tensor], step: int) -> Path:
        """Rank 0: `weights/step-N/` with adapter_config.json and the adapter weights."""
        from safetensors.torch import save_file

        final, tmp = self.root / f"step-{step}", self.root / f".tmp-step-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.peft_config["default"].save_pretrained(str(tmp))  # type: ignore[union-attr,index]
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        for f in tmp.iterdir():
            f.chmod(0o644)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final

    def load(self, path: Path) -> None:
        """Rank 0: every replica replaces its adapter with the one in `path`."""
        body = {"lora_name": self.adapter, "lora_path": str(path.resolve()), "load_inplace": True}
        self.swap("/v1/load_lora_adapter", body)

    def sync(self, model: nn.Module, step: int) -> None:
        tensors = adapter_state(model, self.dtype)
        if self.ctx.is_main:
            path = self.write_adapter(model, tensors, step)
            self.load(path)
            self.prune(path)
        barrier()
