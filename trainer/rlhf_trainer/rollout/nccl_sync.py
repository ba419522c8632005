"""The `nccl` weight sync: vLLM's weight-transfer engine over NCCL (GPU clusters).

Servers run with `--weight-transfer-config '{"backend": "nccl"}'`. Once: `POST
/init_weight_transfer_engine` on every replica while rank 0 opens the rendezvous as NCCL rank 0
(replica i's workers take the ranks after the replicas before it; each replica's size comes
from `GET /get_world_size`). Per sync: `/pause`, `/start_weight_update`, then `/update_weights`
with the names, dtypes and shapes while rank 0 broadcasts the tensors (every rank takes part
in gathering each FSDP-sharded weight), `/finish_weight_update`, `/reset_prefix_cache`,
`/resume`. The data plane is vLLM's own (`nccl_common.trainer_init`, the packed broadcast),
imported only when the group opens, so the trainer image needs vLLM for this backend.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import httpx
import torch
from torch import nn

from rlhf_trainer.config import RolloutTarget
from rlhf_trainer.rollout.weight_sync import ServerControl
from rlhf_trainer.runtime.distributed import DistContext, barrier
from rlhf_trainer.runtime.metrics import SyncBackend

log = logging.getLogger(__name__)


class WeightChannel(Protocol):
    """The NCCL data plane as rank 0 sees it: an open group to broadcast tensors into."""

    def send(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


class ChannelFactory(Protocol):
    def wire_params(self) -> dict[str, Any]:
        """Settings both ends must share, sent in every replica's init info (packing)."""
        ...

    def open(self, address: str, port: int, world_size: int) -> WeightChannel:
        """Join the group as rank 0; blocks until every server rank has joined."""
        ...


class VllmNccl:
    """vLLM's own NCCL data plane: `nccl_common.trainer_init` and the packed broadcast."""

    def wire_params(self) -> dict[str, Any]:
        from vllm.distributed.weight_transfer import packed_tensor

        return {
            "packed": True,
            "packed_buffer_size_bytes": packed_tensor.DEFAULT_PACKED_BUFFER_SIZE_BYTES,
            "packed_num_buffers": packed_tensor.DEFAULT_PACKED_NUM_BUFFERS,
        }

    def open(self, address: str, port: int, world_size: int) -> WeightChannel:
        return VllmNcclChannel(address, port, world_size)


class VllmNcclChannel:
    def __init__(self, address: str, port: int, world_size: int) -> None:
        from vllm.distributed.weight_transfer import packed_tensor
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.packed = packed_tensor
        rendezvous = {"master_address": address, "master_port": port, "world_size": world_size}
        self.group: Any = trainer_init(rendezvous)

    def send(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        self.packed.packed_nccl_broadcast_producer(
            iterator=tensors,
            group=self.group,
            src=0,
            post_iter_func=lambda item: item[1],
            buffer_size_bytes=self.packed.DEFAULT_PACKED_BUFFER_SIZE_BYTES,
            num_buffers=self.packed.DEFAULT_PACKED_NUM_BUFFERS,
        )

    def close(self) -> None:
        self.group.destroy()


def free_port() -> int:
    """A free TCP port on this host (for the NCCL rendezvous rank 0 hosts)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def rendezvous_address() -> str:
    """Where servers reach rank 0: its pod IP (downward API), else this host."""
    return os.environ.get("POD_IP") or "127.0.0.1"


class NcclWeightSync:
    """`nccl`: vLLM's weight-transfer engine over NCCL, rank 0 broadcasting to every replica."""

    backend: SyncBackend = "nccl"

    def __init__(
        self,
        target: RolloutTarget,
        ctx: DistContext,
        dtype: torch.dtype,
        port: int,
        channel: ChannelFactory | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.ctx, self.dtype = ctx, dtype
        self.control = ServerControl(target, transport) if ctx.is_main else None
        self.channel: WeightChannel | None = None
        if self.control is not None:
            self.channel = self._init(self.control, port, channel or VllmNccl())

    def _init(self, control: ServerControl, port: int, factory: ChannelFactory) -> WeightChannel:
        sizes = [self._server_world_size(control, url) for url in control.urls]
        world, address = 1 + sum(sizes), rendezvous_address()
        infos = [
            {
                "master_address": address,
                "master_port": port,
                "rank_offset": 1 + sum(sizes[:i]),  # replica i's workers follow the ones before
                "world_size": world,
                **factory.wire_params(),
            }
            for i in range(len(sizes))
        ]
        # Each server blocks in /init_weight_transfer_engine until every rank has joined the
        # group that rank 0 opens here, so the calls and the opening run at once.
        with ThreadPoolExecutor(max_workers=len(infos)) as pool:
            futures = [
                pool.submit(control.post, url, "/init_weight_transfer_engine", {"init_info": info})
                for url, info in zip(control.urls, infos, strict=True)
            ]
            channel = factory.open(address, port, world)
            for future in futures:
                future.result()
        log.info("Joined the NCCL weight-transfer group of %d ranks at %s:%d", world, address, port)
        return channel

    @staticmethod
    def _server_world_size(control: ServerControl, url: str) -> int:
        answer = control.get(url, "/get_world_size?include_dp=true")
        size = answer.get("world_size") if isinstance(answer, dict) else None
        return int(size) if isinstance(size, int) and size > 0 else 1

    def _tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight in full, one at a time (a collective gather on every rank)."""
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        for name, value in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            yield name, full.to(self.dtype).contiguous()

    def metadata(self, model: nn.Module) -> dict[str, list[Any]]:
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        names, shapes = [], []
        for name, value in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            names.append(name)
            shapes.append(list(value.shape))
        dtype = str(self.dtype).removeprefix("torch.")
        return {"names": names, "dtype_names": [dtype] * len(names), "shapes": shapes}

    def sync(self, model: nn.Module, step: int) -> None:
        if self.control is None or self.channel is None:
            for _ in self._tensors(model):  # the other ranks take part in every gather
                pass
            barrier()
            return
        control, channel = self.control, self.channel
        update_info = self.metadata(model)
        control.each(lambda url: control.post(url, "/pause"))
        control.each(lambda url: control.post(url, "/start_weight_update"))
        with ThreadPoolExecutor(max_workers=len(control.urls)) as pool:
            # The servers receive inside /update_weights, concurrently with the broadcast.
            futures = [
                pool.submit(control.post, url, "/update_weights", {"update_info": update_info})
                for url in control.urls
            ]
            channel.send(self._tensors(model))
            for future in futures:
                future.result()
        version = {"weight_version": str(step)}
        control.each(lambda url: control.post(url, "/finish_weight_update", version))
        control.each(lambda url: control.post(url, "/reset_prefix_cache"))
        control.each(lambda url: control.post(url, "/resume"))
        barrier()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.control is not None:
            self.control.close()
