"""Sequences that share a prompt, packed into one row (`data/packed.py`): every logit must equal the
one the sequence gives alone, for DPO's pairs and for the online stages' sampled groups, with
the boolean (sdpa) and the additive (eager) mask; and the row layout follows the cost estimate."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from rlhf_trainer.algos.losses import (
    IGNORE_INDEX,
    sequence_logprobs,
    sft_loss_sum,
    sft_loss_sum_at,
    sft_scored,
)
from rlhf_trainer.data.batching import Example, PairExample
from rlhf_trainer.data.packed import (
    best_layout,
    common_prefix,
    kept_logits,
    mask_dtype,
    pack,
    packed_logits,
    shared_prompt_groups,
    supports_packing,
)
from rlhf_trainer.offline.dpo import packed_pair_logprobs
from rlhf_trainer.offline.reward import pair_tensors
from rlhf_trainer.online.experience import _packed, collate_samples, policy_logprobs
from rlhf_trainer.rollout.client import Sample

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


def count_head_rows(model: Any) -> tuple[list[int], Any]:
    """A list that gets, per forward pass, the rows (positions) the output layer sees, and the
    hook's handle to remove."""
    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].numel() // args[0].size(-1))
    )
    return seen, hook


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
    """A narrow model with long tails pays more for an L^2 row than for repeating a short
    prompt; the split is the same k for every group (rows are padded to the longest)."""
    sequences = [[5] * 4 + [6 + j] * 60 for j in range(8)]
    sequences += [[9] * 4 + [6 + j] * 5 for j in range(8)]
    groups = [list(range(8)), list(range(8, 16))]
    layout = best_layout(sequences, groups, tiny(hidden=32))
    assert layout is not None
    units = [unit for row in layout for unit in row]
    assert max(len(members) for _, members in units) < 8
    assert sorted(i for _, members in units for i in members) == list(range(16))
    short = [[5] * 40 + [6 + j] * 2 for j in range(8)]  # long prompt, short tails: one unit
    assert best_layout(short, [list(range(8))], tiny(hidden=32)) == [[(40, list(range(8)))]]
    assert best_layout(short, [list(range(8))], None) is None  # no cost model: no choice


def test_short_sequences_share_rows_when_that_saves_padding() -> None:
    """Sequence packing: one long sequence and many short ones, each its own group (PPO's one
    sample per prompt); the short ones fill rows as long as the long one instead of each
    being padded to it."""
    sequences = [[5] * 64] + [[6] * n for n in (9, 12, 15, 10, 20, 14, 11, 16)]
    groups = [[i] for i in range(len(sequences))]
    layout = best_layout(sequences, groups, tiny(hidden=32))
    assert layout is not None and len(layout) < len(sequences)
    width = max(sum(len(sequences[m[0]]) for _, m in row) for row in layout)
    assert width == 64  # no row longer than the longest sequence needs
    model = tiny(hidden=32)
    packed = pack(sequences, groups, 0, torch.device("cpu"), model)
    with torch.no_grad():
        flat = packed_logits(model, packed)
    for i, sequence in enumerate(sequences):
        got = flat[packed.source[i, : len(sequence)]]
        assert torch.allclose(got, alone(model, sequence), atol=1e-5), i


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
    model = tiny().train()
    seen, hook = count_head_rows(model)
    weights = torch.linspace(-1, 1, 2 * len(pairs))
    packed, counts = packed_pair_logprobs(model, pairs, 0, torch.device("cpu"))
    (packed * weights).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    t = pair_tensors(pairs, 0, torch.device("cpu"))
    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    padded, padded_counts = sequence_logprobs(logits, t["labels"])
    (padded * weights).sum().backward()
    hook.remove()
    assert torch.allclose(packed, padded, atol=1e-5)
    assert torch.equal(counts, padded_counts)  # a shared first response token counts for both
    # The output layer ran once per scored position of the packed rows: a position the two
    # sequences share (same tokens up to it: the prompt, and here the first response token)
    # once for both.
    distinct = sum(
        len({tuple(e.input_ids[: t + 1]) for e in (p.chosen, p.rejected)
             for t in range(len(e.labels) - 1) if e.labels[t + 1] != IGNORE_INDEX})
        for p in pairs
    )  # fmt: skip
    assert seen[0] == distinct < int(counts.sum()), (seen, distinct, counts)
    for with_keep, full in zip(packed_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(with_keep, full, atol=1e-5)


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
    assert _packed(model, batch) is not None
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


def test_kept_positions_alone_go_through_the_output_layer() -> None:
    """`packed_logits(keep=)`: the output layer sees only the kept positions, and their logits
    and the gradients they send back equal those of the full output, indexed."""
    model = tiny().train()
    sequences, groups = grouped_sequences(seed=9)
    packed = pack(sequences, groups, 0, torch.device("cpu"), model)
    keep = packed.source[:, 2:5]  # (N, 3): some positions of every sequence, repeats included
    seen, hook = count_head_rows(model)
    grads = []
    for kept in (True, False):
        model.zero_grad()
        logits = packed_logits(model, packed, keep=keep) if kept else packed_logits(model, packed)
        out = logits if kept else logits[keep]
        (out * torch.linspace(-1, 1, VOCAB)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if kept:
            expected_shape, first = (*keep.shape, VOCAB), out.detach()
            assert out.shape == expected_shape
    hook.remove()
    assert seen == [keep.numel(), packed.input_ids.numel()]
    with torch.no_grad():
        assert torch.allclose(first, packed_logits(model, packed)[keep], atol=1e-6)
    for with_keep, full in zip(*grads, strict=True):
        assert torch.allclose(with_keep, full, atol=1e-5)


def test_sft_loss_from_the_scored_positions_equals_the_full_loss() -> None:
    """SFT's loss pass (`sft_scored`, `kept_logits`, `sft_loss_sum_at`): the output layer sees
    only the positions whose next label is scored, and the loss and every gradient equal
    `sft_loss_sum` over the full logits, with padding and prompt masked."""
    model = tiny().train()
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, VOCAB, (3, 10), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # a padded row
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompts
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[2, 6] = IGNORE_INDEX  # a masked token inside a response
    seen, hook = count_head_rows(model)
    results = []
    for kept in (True, False):
        model.zero_grad()
        if kept:
            keep, targets = sft_scored(labels)
            logits = kept_logits(
                model, keep, lambda: model(input_ids=input_ids, attention_mask=attention_mask)
            )
            loss = sft_loss_sum_at(logits, targets)
        else:
            full = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = sft_loss_sum(full, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    hook.remove()
    scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert seen == [scored, input_ids.numel()]
    (kept_loss, kept_grads), (full_loss, full_grads) = results
    assert torch.allclose(kept_loss, full_loss, atol=1e-5)
    for with_keep, whole in zip(kept_grads, full_grads, strict=True):
        assert torch.allclose(with_keep, whole, atol=1e-5)


def test_a_batch_with_nothing_to_save_runs_unpacked() -> None:
    """Distinct prompts, all one length: no prompt to share, no padding to fill."""
    same = [Sample(i, (4 + i,) * 6, (9, 10, 11), (0.0,) * 3, "length") for i in range(4)]
    assert _packed(tiny(), collate_samples(same, 0, torch.device("cpu"))) is None
    varied = collate_samples(samples(6, 1, seed=4), 0, torch.device("cpu"))
    model = tiny()
    model.config._attn_implementation = "flash_attention_2"  # its kernels take no 4D mask
    assert _packed(model, varied) is None


def test_distinct_prompts_of_varied_length_pack_and_match() -> None:
    """PPO's batch (one sample per prompt): short sequences share rows."""
    model = tiny()
    batch = collate_samples(samples(12, 1, seed=5), 0, torch.device("cpu"))
    packed = _packed(model, batch)
    assert packed is not None and packed[0].input_ids.size(0) < 12
    with torch.no_grad():
        logprobs, _ = policy_logprobs(model, batch)
    for i in range(batch.sequences.size(0)):
        expected, n = alone_response(model, batch, i)
        assert torch.allclose(logprobs[i, :n], expected, atol=1e-5), i


def test_critic_values_are_the_same_packed_or_alone() -> None:
    from torch import nn

    from rlhf_trainer.models.online_models import ValueModel
    from rlhf_trainer.online.experience import critic_values

    torch.manual_seed(0)
    critic = ValueModel(tiny().model, nn.Linear(32, 1))
    batch = collate_samples(samples(3, 4, seed=6) + samples(5, 1, seed=7), 0, torch.device("cpu"))
    assert _packed(critic, batch) is not None
    with torch.no_grad():
        values = critic_values(critic, batch)
        for i in range(batch.sequences.size(0)):
            p, n = batch.prompt_len, int(batch.response_mask[i].sum())
            real = batch.attention_mask[i].bool()
            prompt = batch.sequences[i, :p][real[:p]].tolist()
            sequence = torch.tensor([prompt + batch.sequences[i, p : p + n].tolist()])
            alone_values = critic(input_ids=sequence, attention_mask=torch.ones_like(sequence))
            expected = alone_values[0, len(prompt) - 1 : len(prompt) - 1 + n]
            assert torch.allclose(values[i, :n], expected, atol=1e-5), i
            assert torch.all(values[i, n:] == 0)


def test_bf16_on_cpu_trains_with_eager_attention_and_packs_alike(ctx: Any) -> None:
    """`distributed.shard_model` with bf16 on CPU swaps sdpa for eager attention (faster there,
    docs/BENCHMARKS.md); float32 keeps sdpa. The eager bf16 forward still packs, and its packed
    logprobs agree with the sdpa bf16 model's unpacked ones to bf16 rounding."""
    from rlhf_trainer.runtime.distributed import shard_model

    kept = shard_model(tiny(), bf16=False)
    assert kept.config._attn_implementation == "sdpa"
    batch = collate_samples(samples(3, 4, seed=3), 0, torch.device("cpu"))
    reference = tiny().to(torch.bfloat16)  # plain bf16 weights, sdpa, each row alone
    rows = [alone_response(reference, batch, i) for i in range(batch.sequences.size(0))]
    model = shard_model(tiny(), bf16=True)
    assert model.config._attn_implementation == "eager"
    assert mask_dtype(model) == torch.float32 and _packed(model, batch) is not None
    with torch.no_grad():
        packed, _ = policy_logprobs(model, batch)
    for i, (logprobs, n) in enumerate(rows):
        assert torch.allclose(packed[i, :n], logprobs.float(), atol=0.05), i
