"""SFT loss against a naive reference; batch-split invariance; tokenization and data order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf_trainer.algos.losses import IGNORE_INDEX, count_targets, sft_loss_sum
from rlhf_trainer.data.batching import DataStream, collate, rank_micro_batches, tokenize_sft
from rlhf_trainer.data.inputs import micro_batch_size
from rlhf_trainer.data.readers import SFTRow
from rlhf_trainer.errors import UserError

pytestmark = pytest.mark.unit


def naive_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[target])
    return total


def random_batch(b: int, t: int, v: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(b * 100 + t)
    logits = torch.randn(b, t, v, generator=gen).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.4] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("b", "t", "v"), [(1, 2, 3), (2, 7, 11), (4, 16, 50)])
def test_sft_loss_sum_matches_naive(dtype: torch.dtype, b: int, t: int, v: int) -> None:
    logits, labels = random_batch(b, t, v, dtype)
    got = sft_loss_sum(logits, labels)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(naive_loss_sum(logits, labels), rel=1e-5, abs=1e-5)
    assert count_targets(labels) == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_all_masked_is_zero() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE_INDEX)
    assert float(sft_loss_sum(logits, labels)) == 0.0
    assert count_targets(labels) == 0


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 1), (1, 4), (2, 2), (4, 2)])
def test_split_over_ranks_and_microsteps_gives_the_global_mean(world: int, accum: int) -> None:
    """Summing per-slice losses divided by the global target count, as train_step does, equals
    the token mean over the whole batch however the batch is split."""
    logits, labels = random_batch(8, 9, 13, torch.float64)
    full_mean = float(sft_loss_sum(logits, labels)) / count_targets(labels)
    global_count = count_targets(labels)
    total = 0.0
    for rank in range(world):
        for indices in rank_micro_batches(list(range(8)), world, rank, accum):
            total += float(sft_loss_sum(logits[indices], labels[indices])) / global_count
    assert total == pytest.approx(full_mean, rel=1e-6)


def test_rank_micro_batches_partition_the_global_batch() -> None:
    batch = list(range(100, 124))
    seen = []
    for rank in range(3):
        micro = rank_micro_batches(batch, 3, rank, 2)
        assert [len(m) for m in micro] == [4, 4]
        seen += [i for m in micro for i in m]
    assert sorted(seen) == batch


def test_indivisible_batch_is_refused_with_the_fix() -> None:
    assert micro_batch_size(16, 2, 2) == 4
    with pytest.raises(UserError) as err:
        micro_batch_size(10, 4, 1)
    assert str(err.value).startswith("hyperparameters.batchSize: 10 does not divide into 4 ranks")
    assert "multiple of 4" in str(err.value)


def test_unshuffled_stream_keeps_the_file_order_and_resumes_in_it() -> None:
    a = DataStream(6, seed=3, shuffle=False)
    assert [a.next_batch(4) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]
    resumed = a.at(1, 2)
    assert not resumed.shuffle and resumed.next_batch(4) == [2, 3, 4, 5]
    assert DataStream(6, seed=3).at(0, 0).shuffle  # `at` keeps a shuffled order shuffled


def test_data_stream_is_seeded_and_resumable() -> None:
    a = DataStream(10, seed=3)
    order = [a.next_batch(4) for _ in range(6)]  # 24 examples: 2.4 epochs
    assert sorted(order[0] + order[1] + order[2][:2]) == list(range(10))
    assert sorted(order[2][2:] + order[3] + order[4]) == list(range(10))
    assert (a.epoch, a.index, a.epochs_done) == (2, 4, 2.4)
    fresh = DataStream(10, seed=3)
    assert [fresh.next_batch(4) for _ in range(6)] == order
    b = DataStream(10, seed=3)
    for _ in range(3):
        b.next_batch(4)
    resumed = DataStream(10, seed=3, epoch=b.epoch, index=b.index)
    assert [resumed.next_batch(4) for _ in range(3)] == order[3:]
    assert DataStream(10, seed=4).next_batch(10) != DataStream(10, seed=3).next_batch(10)


def test_tokenize_masks_prompt_and_keeps_response_when_truncating(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = SFTRow("What does the cow say?\nAnswer:", " moo.")
    [ex] = tokenize_sft([row], tokenizer, max_length=512)
    n_prompt = len(tokenizer(row.prompt)["input_ids"])
    assert ex.input_ids[0] == tokenizer.bos_token_id
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[n_prompt:-1]) == " moo."
    [short] = tokenize_sft([row], tokenizer, max_length=6)
    n_response = len(ex.input_ids) - n_prompt
    assert len(short.input_ids) == 6
    assert short.input_ids[-n_response:] == ex.input_ids[-n_response:]
    batch = collate([ex, short], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ex.input_ids))
    assert int(batch["attention_mask"][1].sum()) == 6
    assert count_targets(batch["labels"]) == 2 * n_response
    assert int(batch["attention_mask"][0].sum()) == len(ex.input_ids)
