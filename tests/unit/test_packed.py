"""Sequences that share a prompt, packed into one row (`packed.py`): every logit must equal the
one the sequence gives alone, for DPO's pairs and for the online stages' sampled groups, with
the boolean (sdpa) and the additive (eager) mask; and the row layout follows the cost estimate."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from rlhf_trainer.batching import Example, PairExample
from rlhf_trainer.dpo import packed_pair_logprobs
from rlhf_trainer.experience import _packed_responses, collate_samples, policy_logprobs
from rlhf_trainer.losses import IGNORE_INDEX, sequence_logprobs
from rlhf_trainer.packed import (
    _rows,
    common_prefix,
    mask_dtype,
    pack,
    packed_logits,
    shared_prompt_groups,
    supports_packing,
)
from rlhf_trainer.reward import pair_tensors
from rlhf_trainer.rollout import Sample

pytestmark = pytest.mark.unit

VOCAB = 64


def tiny(attention: str = "sdpa", hidden: int = 32) -> Any:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=256, attn_implementation=attention,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def alone(model: Any, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([sequence])).logits[0]


def grouped_sequences(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Groups of 1, 2, 3 and 5 sequences on shared prompts, tails of varied length, one tail
    repeated (identical samples happen) and one group whose tails also share their start."""
    rng = random.Random(seed)
    sequences: list[list[int]] = []
    groups: list[list[int]] = []
    for size in (1, 2, 3, 5):
        prompt = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 9))]
        members = []
        for j in range(size):
            tail = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 7))]
            if size == 5 and j == 4:
                tail = list(sequences[members[0]][len(prompt) :])  # a repeat
            if size == 3:
                tail = [7, 8, *tail]  # a common start beyond the prompt
            members.append(len(sequences))
            sequences.append(prompt + tail)
        groups.append(members)
    return sequences, groups


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_packed_logit_equals_the_sequence_alone(attention: str) -> None:
    model = tiny(attention)
    sequences, groups = grouped_sequences(seed=1)
    packed = pack(sequences, groups, pad_id=0, device=torch.device("cpu"), model=model,
                  mask_dtype=mask_dtype(model))  # fmt: skip
    assert packed.attention_mask.dtype == (torch.bool if attention == "sdpa" else torch.float32)
    with torch.no_grad():
        flat = packed_logits(model, packed)
    assert packed.input_ids.numel() < sum(map(len, sequences)) + 20  # prompts not repeated
    for i, sequence in enumerate(sequences):
        got = flat[packed.source[i, : len(sequence)]]
        assert torch.allclose(got, alone(model, sequence), atol=1e-5), i


def test_large_groups_are_split_when_attention_would_cost_more() -> None:
    """A wide model with long tails pays more for an L^2 row than for repeating a short
    prompt; the layout is the same k for every group (rows are padded to the longest)."""
    sequences = [[5] * 4 + [6 + j] * 60 for j in range(8)]
    sequences += [[9] * 4 + [6 + j] * 5 for j in range(8)]
    groups = [list(range(8)), list(range(8, 16))]
    rows = _rows(sequences, groups, tiny(hidden=32))
    assert max(len(members) for _, members in rows) < 8
    sizes = {len(members) for _, members in rows}
    assert len(sizes) == 1  # one k for the batch
    short = [[5] * 40 + [6 + j] * 2 for j in range(8)]  # long prompt, short tails: one row
    assert _rows(short, [list(range(8))], tiny(hidden=32)) == [(40, list(range(8)))]
    assert _rows(short, [list(range(8))], None) == [(40, list(range(8)))]


def test_common_prefix_leaves_every_sequence_a_tail() -> None:
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3]]) == 0
    assert shared_prompt_groups([[1, 2], [3], [1, 2], [1]]) == [[0, 2], [1], [3]]


def test_packing_needs_an_attention_that_takes_a_4d_mask() -> None:
    assert supports_packing(tiny("sdpa")) and supports_packing(tiny("eager"))
    model = tiny("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_packing(model)


def example(prompt: list[int], response: list[int]) -> Example:
    return Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response)


def test_packed_dpo_logprobs_equal_the_padded_pairs() -> None:
    rng = random.Random(2)
    pairs = []
    for _ in range(5):
        prompt = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(4, 12))]
        chosen = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 5))]
        rejected = chosen[:1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 5))]
        pairs.append(PairExample(example(prompt, chosen), example(prompt, rejected)))
    model = tiny()
    with torch.no_grad():
        packed, counts = packed_pair_logprobs(model, pairs, 0, torch.device("cpu"))
        t = pair_tensors(pairs, 0, torch.device("cpu"))
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        padded, padded_counts = sequence_logprobs(logits, t["labels"])
    assert torch.allclose(packed, padded, atol=1e-5)
    assert torch.equal(counts, padded_counts)  # a shared first response token counts for both


def samples(groups: int, per_group: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 10)))
        for _ in range(per_group):
            response = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 8)))
            out.append(Sample(g, prompt, response, (0.0,) * len(response), "length"))
    return out


def test_online_response_logprobs_are_the_same_packed_or_not() -> None:
    model = tiny()
    order = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]  # minibatches take shuffled rows
    batch = collate_samples([samples(3, 4, seed=3)[i] for i in order], 0, torch.device("cpu"))
    assert _packed_responses(model, batch) is not None
    with torch.no_grad():
        packed, entropy = policy_logprobs(model, batch, with_entropy=True)
    rows = [alone_response(model, batch, i) for i in range(batch.sequences.size(0))]
    for i, (logprobs, n) in enumerate(rows):
        assert torch.allclose(packed[i, :n], logprobs, atol=1e-5), i
        assert torch.all(packed[i, n:] == 0)
    assert entropy is not None and torch.all(entropy[batch.response_mask == 0] == 0)


def alone_response(model: Any, batch: Any, i: int) -> tuple[torch.Tensor, int]:
    """Row i's response logprobs from its own unpadded sequence."""
    p = batch.prompt_len
    real = batch.attention_mask[i].bool()
    n = int(batch.response_mask[i].sum())
    prompt = batch.sequences[i, :p][real[:p]].tolist()
    response = batch.sequences[i, p : p + n].tolist()
    logits = alone(model, prompt + response)
    picked = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + n], -1)
    return picked.gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1), n


def test_samples_of_distinct_prompts_run_unpacked() -> None:
    batch = collate_samples(samples(4, 1, seed=4), 0, torch.device("cpu"))
    assert _packed_responses(tiny(), batch) is None
