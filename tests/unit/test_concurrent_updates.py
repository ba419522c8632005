"""PPO's critic update on a thread of its own, alongside the actor's (`online_steps`): when the
resources allow it, that the two really overlap, and that they end exactly where the same two
updates run one after the other end. On a 1-rank gloo group, with real modules and optimizers.
A whole PPO stage taking this path is in tests/integration/test_online_vllm.py."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from torch import nn

from helpers import minibatch_setup
from rlhf_trainer.online.experience import Batch, Experience
from rlhf_trainer.online.steps import MinibatchTrainer, concurrent_updates, run_both
from rlhf_trainer.runtime.distributed import DistContext
from rlhf_trainer.training.loop import build_optimizer

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def context(world_size: int, device: str = "cpu") -> DistContext:
    return DistContext(0, world_size, 0, torch.device(device), bf16=False)


@pytest.mark.parametrize(
    ("world_size", "device", "threads", "cpus", "expected"),
    [
        (1, "cpu", 1, 2, True),  # one process, a core for each update
        (1, "cpu", 4, 8, True),
        (1, "cpu", 2, 2, False),  # `rlhf run` on 2 CPUs with 2 torch threads: no room
        (1, "cpu", 4, 7, False),
        (2, "cpu", 1, 16, False),  # FSDP2-sharded models: their collectives would cross
        (1, "cuda", 1, 16, False),  # one GPU for both: not built
    ],
)
def test_concurrency_only_where_the_resources_allow_it(
    world_size: int, device: str, threads: int, cpus: int, expected: bool
) -> None:
    models = [nn.Linear(1, 1), nn.Linear(1, 1)]
    assert concurrent_updates(context(world_size, device), models, threads, cpus) is expected


def test_sharded_models_never_update_concurrently(ctx: DistContext) -> None:
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(nn.Linear(2, 2))  # as FSDP2 leaves a model with more ranks or bf16
    assert not concurrent_updates(ctx, [sharded, nn.Linear(1, 1)], threads=1, cpus=64)


def test_run_both_overlaps_the_two_when_concurrent() -> None:
    """`first` can only finish once `second` has started: sequentially it would time out."""
    started = threading.Event()

    def first() -> str:
        assert started.wait(timeout=10), "second never ran while first was running"
        return threading.current_thread().name

    def second() -> str:
        started.set()
        return threading.current_thread().name

    first_thread, second_thread = run_both(first, second, concurrent=True)
    assert first_thread != second_thread == threading.current_thread().name


def test_run_both_in_order_when_not_concurrent() -> None:
    order: list[str] = []
    out = run_both(lambda: order.append("first") or 1, lambda: order.append("second") or 2, False)
    assert out == (1, 2) and order == ["first", "second"]


def test_an_error_in_the_concurrent_update_is_raised() -> None:
    def broken() -> None:
        raise ValueError("critic blew up")

    with pytest.raises(ValueError, match="critic blew up"):
        run_both(broken, lambda: None, concurrent=True)


def experience(n: int = 16) -> Experience:
    g = torch.Generator().manual_seed(7)
    batch = Batch(
        sequences=torch.zeros(n, 3, dtype=torch.long),
        attention_mask=torch.ones(n, 3, dtype=torch.long),
        response_mask=torch.ones(n, 2),
        behaviour_logprobs=torch.randn(n, 2, generator=g),
    )
    return Experience(batch, torch.zeros(n, 2), torch.randn(n, 2, generator=g),
                      torch.randn(n, generator=g))  # fmt: skip


def fresh(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))


def train_pair(ctx: DistContext, concurrent: bool) -> tuple[dict[str, torch.Tensor], ...]:
    """Two small models (a 'critic' fitting the scores, an 'actor' the advantages), each with
    AdamW, clipping and a scheduler, trained 3 epochs on the same experience."""
    setup = minibatch_setup(ctx, 4, batchSize=8, learningRate=0.05, gradClip=1.0)
    exp = experience()
    hp = setup.inputs.config.hyperparameters
    trainers, models = [], []
    for seed, target in ((0, "scores"), (1, "advantages")):
        model = fresh(seed)
        optimizer, scheduler = build_optimizer(model, hp, 6)
        trainers.append((MinibatchTrainer(setup, model, optimizer, scheduler), target))
        models.append(model)

    def update(index: int) -> dict[str, float]:
        trainer, target = trainers[index]
        model = models[index]

        def loss(sub: Experience) -> tuple[torch.Tensor, dict[str, float]]:
            out = model(sub.batch.behaviour_logprobs)
            wanted = sub.advantages
            if target == "scores":
                wanted = sub.scores.unsqueeze(1).expand_as(out)
            return ((out - wanted) ** 2).sum(), {}

        return trainer.run(exp, loss, random.Random(index), epochs=3)

    run_both(lambda: update(0), lambda: update(1), concurrent)
    return tuple({k: v.detach().clone() for k, v in m.state_dict().items()} for m in models)


def test_concurrent_updates_end_exactly_where_sequential_ones_do(ctx: DistContext) -> None:
    before = [fresh(0), fresh(1)]
    sequential = train_pair(ctx, concurrent=False)
    concurrent = train_pair(ctx, concurrent=True)
    for seq, conc, untrained in zip(sequential, concurrent, before, strict=True):
        assert seq.keys() == conc.keys()
        for key in seq:
            assert torch.equal(seq[key], conc[key]), key
        assert not torch.equal(seq["0.weight"], untrained.state_dict()["0.weight"])  # it trained
