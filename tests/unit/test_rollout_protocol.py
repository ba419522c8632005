"""The rollout client and both weight-sync backends at the HTTP-protocol level, against local
fake servers that record what they receive (`fake_rollout_server.py`): one large concurrent
batch spread over the replicas, a clear error when a server is gone, the disk sync's route
sequence, and vLLM's weight-transfer protocol for nccl (with the NCCL data plane replaced by a
recorder, since it needs GPUs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fake_rollout_server import FakeServer, fake_server
from rlhf_trainer.config import RolloutTarget
from rlhf_trainer.rollout.client import RolloutClient, RolloutError, Sampling
from rlhf_trainer.rollout.nccl_sync import NcclWeightSync
from rlhf_trainer.rollout.weight_sync import DiskWeightSync, LoraWeightSync, WeightSyncError
from rlhf_trainer.runtime.distributed import DistContext

pytestmark = pytest.mark.unit

DISK_ROUTES = ["/pause", "/collective_rpc", "/reset_prefix_cache", "/resume"]


def target(*urls: str, **options: Any) -> RolloutTarget:
    return RolloutTarget(urls=list(urls), served_model="policy", **options)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.config = type("Config", (), {"tie_word_embeddings": False})()


def test_one_step_is_one_concurrent_batch_spread_evenly_over_replicas() -> None:
    with fake_server(completion_delay_s=0.3) as a, fake_server(completion_delay_s=0.3) as b:
        client = RolloutClient(target(a.url, b.url, concurrency=64))
        prompts = [[1, 2, 3 + i] for i in range(16)]
        started = time.monotonic()
        out = client.generate(prompts, Sampling(n=4, max_tokens=3, temperature=1.0, seed=10))
        elapsed = time.monotonic() - started
    # 16 requests of 0.3 s each: sequentially 4.8 s; as one concurrent batch about 0.3 s.
    assert elapsed < 2.0, elapsed
    assert a.max_in_flight > 1 and b.max_in_flight > 1
    assert len(a.requests) == len(b.requests) == 8
    assert [len(group) for group in out] == [4] * 16
    sample = out[5][2]
    assert sample.prompt_index == 5 and sample.prompt_ids == (1, 2, 8)
    assert sample.response_ids == (9, 10, 11) and sample.logprobs == (-1.0, -1.0, -1.0)
    bodies = [r.body for r in a.requests + b.requests]
    assert sorted(body["seed"] for body in bodies) == list(range(10, 26))  # one per prompt
    assert all(body["n"] == 4 and body["logprobs"] == 0 for body in bodies)
    assert all(body["return_tokens_as_token_ids"] and body["model"] == "policy" for body in bodies)


def test_greedy_requests_carry_no_seed() -> None:
    with fake_server() as a:
        RolloutClient(target(a.url)).generate([[1]], Sampling(n=1, max_tokens=2, temperature=0))
    assert "seed" not in a.requests[0].body and a.requests[0].body["temperature"] == 0


def test_a_gone_server_fails_the_step_with_a_clear_error_after_bounded_retries() -> None:
    with fake_server() as a:
        gone = a.url
    client = RolloutClient(target(gone, max_retries=2, timeout_seconds=2))
    started = time.monotonic()
    with pytest.raises(RolloutError, match=r"after 2 retries.*check that the rollout server"):
        client.generate([[1]], Sampling(n=1, max_tokens=2, temperature=1.0))
    assert time.monotonic() - started < 10


def test_a_failing_server_is_retried_then_reported() -> None:
    with fake_server(fail_status={"/v1/completions": 503}) as a:
        client = RolloutClient(target(a.url, max_retries=1))
        with pytest.raises(RolloutError, match="HTTP 503"):
            client.generate([[1]], Sampling(n=1, max_tokens=2, temperature=1.0))
        assert len(a.requests) == 2  # the first try and one retry


def test_disk_sync_writes_a_snapshot_and_reloads_every_replica_in_order(
    ctx: DistContext, tmp_path: Path
) -> None:
    model = TinyLM()
    with fake_server() as a, fake_server() as b:
        sync = DiskWeightSync(target(a.url, b.url), tmp_path / "weights", ctx, torch.float32)
        sync.sync(model, step=3)
        sync.sync(model, step=4)
        sync.close()
    for server in (a, b):
        assert server.paths() == DISK_ROUTES * 2
        rpc = server.requests[1].body
        assert rpc["method"] == "reload_weights"
        assert rpc["kwargs"]["weights_path"] == str((tmp_path / "weights" / "step-3").resolve())
    from safetensors.torch import load_file

    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["step-4"]  # older ones go
    state = load_file(str(tmp_path / "weights" / "step-4" / "model.safetensors"))
    torch.testing.assert_close(state["head.weight"], model.head.weight.detach())


def test_disk_sync_names_the_missing_dev_mode(ctx: DistContext, tmp_path: Path) -> None:
    with fake_server(fail_status={"/collective_rpc": 404}) as a:
        sync = DiskWeightSync(target(a.url), tmp_path / "w", ctx, torch.float32)
        with pytest.raises(WeightSyncError, match="VLLM_SERVER_DEV_MODE=1"):
            sync.sync(TinyLM(), step=1)


def test_lora_sync_sends_only_the_adapters(ctx: DistContext, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    with fake_server() as a:
        sync = LoraWeightSync(
            target(a.url, lora_adapter="policy-lora"), tmp_path / "w", ctx, torch.float32
        )
        sync.sync(model, step=2)
    assert a.paths() == ["/pause", "/v1/load_lora_adapter", "/reset_prefix_cache", "/resume"]
    body = a.requests[1].body
    folder = tmp_path / "w" / "step-2"
    assert body == {"lora_name": "policy-lora", "lora_path": str(folder.resolve()),
                    "load_inplace": True}  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert weights and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in weights)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights


class RecordingChannel:
    """Stands in for vLLM's NCCL broadcast; checks that /update_weights is in flight."""

    def __init__(self, servers: list[FakeServer]) -> None:
        self.servers = servers
        self.opened: tuple[str, int, int] | None = None
        self.sent: list[tuple[str, torch.Tensor]] = []
        self.update_in_flight: list[bool] = []

    def wire_params(self) -> dict[str, Any]:
        return {"packed": True, "packed_buffer_size_bytes": 1024, "packed_num_buffers": 2}

    def open(self, address: str, port: int, world_size: int) -> RecordingChannel:
        self.opened = (address, port, world_size)
        return self

    def send(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        time.sleep(0.2)  # the servers' /update_weights calls arrive meanwhile
        self.update_in_flight = [
            any(r.path == "/update_weights" for r in s.requests) for s in self.servers
        ]
        self.sent = list(tensors)

    def close(self) -> None:
        pass


def test_nccl_sync_speaks_vllms_weight_transfer_protocol(ctx: DistContext) -> None:
    model = TinyLM()
    with fake_server(world_size=2) as a, fake_server(world_size=1) as b:
        channel = RecordingChannel([a, b])
        sync = NcclWeightSync(
            target(a.url, b.url, weight_sync="nccl"), ctx, torch.bfloat16, 29555, channel
        )
        inits = [s.requests[-1].body["init_info"] for s in (a, b)]
        sync.sync(model, step=7)
        sync.close()
    assert channel.opened == ("127.0.0.1", 29555, 4)  # trainer rank 0, 2 + 1 server ranks
    assert [i["rank_offset"] for i in inits] == [1, 3]
    assert all(i["world_size"] == 4 and i["master_port"] == 29555 for i in inits)
    assert all(i["packed"] is True and i["packed_num_buffers"] == 2 for i in inits)
    for server in (a, b):
        assert server.control_paths() == [
            "/get_world_size?include_dp=true",
            "/init_weight_transfer_engine",
            "/pause",
            "/start_weight_update",
            "/update_weights",
            "/finish_weight_update",
            "/reset_prefix_cache",
            "/resume",
        ]
        update = next(r.body for r in server.requests if r.path == "/update_weights")
        info = update["update_info"]
        assert info["names"] == ["embed.weight", "head.weight"]
        assert info["dtype_names"] == ["bfloat16", "bfloat16"]
        assert info["shapes"] == [[6, 4], [6, 4]]
        finish = next(r.body for r in server.requests if r.path == "/finish_weight_update")
        assert finish == {"weight_version": "7"}
    assert channel.update_in_flight == [True, True]  # received while the broadcast ran
    assert [name for name, _ in channel.sent] == ["embed.weight", "head.weight"]
    assert all(t.dtype == torch.bfloat16 for _, t in channel.sent)


def test_nccl_init_runs_while_the_rendezvous_opens(ctx: DistContext) -> None:
    """A server answers /init_weight_transfer_engine only once rank 0 has joined the group, so
    the client must open the group while the calls are in flight, not after them."""
    joined = threading.Event()

    class JoiningChannel(RecordingChannel):
        def open(self, address: str, port: int, world_size: int) -> RecordingChannel:
            joined.set()
            return self

    gates = {"/init_weight_transfer_engine": joined}
    with fake_server(gates=gates) as a, fake_server(gates=gates) as b:
        channel = JoiningChannel([a, b])
        targets = target(a.url, b.url, weight_sync="nccl", max_retries=0)
        NcclWeightSync(targets, ctx, torch.float32, 29556, channel)
    assert joined.is_set()
