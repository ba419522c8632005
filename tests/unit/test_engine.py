"""Generation inside the trainer (`rollout.engine: trainer`): the decoders against the model's
own forward, sampling against a naive reference, and the engine's contract with the online loop
(n samples per prompt, stops, seeds, the parity probe's teacher-forced rescoring, weight loads).

Models are random-init, built here from configs: Llama (multi-head and grouped-query, tied and
untied embeddings), Qwen2 (q/k/v biases) for the fused decoder, and Llama with a dynamic
rotary scaling (which the fused decoder leaves to the model's own forward)."""

from __future__ import annotations

import collections
import itertools
import math
from typing import Any

import pytest
import torch

from rlhf_trainer.rollout.client import RolloutError, Sample, Sampling
from rlhf_trainer.rollout.decoders import (
    FEW_ROWS,
    HFDecoder,
    Linear,
    LlamaDecoder,
    build_decoder,
    fused_supported,
    prefill_buckets,
    weight_major,
)
from rlhf_trainer.rollout.engine import (
    EngineSync,
    TrainerEngine,
    live_state,
    nucleus,
    sample_tokens,
    score_sample,
)

pytestmark = pytest.mark.unit

VOCAB = 96
EOS = 2


def tiny(kind: str, **extra: Any) -> Any:
    """A random-init causal LM of `kind`, in eval mode."""
    import transformers

    common: dict[str, Any] = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
        "eos_token_id": EOS, "pad_token_id": 3,
    }  # fmt: skip
    common |= extra
    config: Any
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common)
    else:
        config = transformers.LlamaConfig(**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init is near-uniform; spread the logits so sampling varies
        model.lm_head.weight.mul_(20.0)
    return model


MODELS = {
    "llama": {},
    "llama-gqa": {"num_key_value_heads": 2},
    "llama-tied": {"tie_word_embeddings": True},
    "qwen2": {"kind": "qwen2", "num_key_value_heads": 2},
    "llama-dynamic-rope": {
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    },
}


def model_named(name: str) -> Any:
    extra = dict(MODELS[name])
    return tiny(extra.pop("kind", "llama"), **extra)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths, without the EOS id."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 3, 12, 7, 6][:count]
    return [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def forward_logprobs(model: Any, sample: Sample) -> torch.Tensor:
    """The training forward's logprobs of a sample's response tokens (one unpadded row)."""
    ids = torch.tensor([list(sample.prompt_ids) + list(sample.response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start, tokens = len(sample.prompt_ids) - 1, torch.tensor(sample.response_ids)
    picked = torch.log_softmax(logits[start : start + len(tokens)], -1)
    return picked.gather(1, tokens.unsqueeze(1)).squeeze(1)


def engine_for(model: Any, per_batch: int = 64) -> TrainerEngine:
    engine = TrainerEngine(model.config, [EOS], torch.device("cpu"), torch.float32, per_batch)
    state = live_state(model)
    assert state is not None
    engine.load(state)
    return engine


FALLBACK = "llama-dynamic-rope"  # the one model the fused decoder leaves to its own forward


@pytest.mark.parametrize(
    ("name", "buckets"),
    [(n, "one") for n in MODELS] + [(n, "by length") for n in MODELS if n != FALLBACK],
)
def test_engine_logprobs_match_the_training_forward(name: str, buckets: str) -> None:
    """Every sampled token's logprob is what the model's own forward gives the finished
    sequence, whichever decoder runs (left padding, a forked prompt pass, n samples), with the
    prompt pass in one bucket or in one per prompt length (the fused decoder's split)."""
    model = model_named(name)
    engine = engine_for(model)
    fused = name != FALLBACK
    assert isinstance(engine.decoder, LlamaDecoder if fused else HFDecoder)
    if isinstance(engine.decoder, LlamaDecoder):
        # No bucket overhead: every distinct length gets its own pass; a huge one: one pass.
        engine.decoder.bucket_flops = 0.0 if buckets == "by length" else 1e30
    groups = engine.generate(prompts(4), Sampling(n=3, max_tokens=10, temperature=1.0, seed=7))
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    for i, group in enumerate(groups):
        for sample in group:
            assert sample.prompt_index == i and list(sample.prompt_ids) == prompts(4)[i]
            reference = forward_logprobs(model, sample)
            got = torch.tensor(sample.logprobs)
            assert torch.allclose(got, reference, atol=2e-5), (got - reference).abs().max()


@pytest.mark.parametrize("rows", [1, 16, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("block", [None, 7, 1000])
def test_weight_major_products_equal_the_linear_layer(rows: int, block: int | None) -> None:
    """The decoder's few-row matmuls (weight @ x^T, optionally in blocks of weight rows, some
    of them short) give what `F.linear` gives, in its shape, bias included, and past
    `FEW_ROWS` rows take `F.linear` itself."""
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 1, 24), torch.randn(50, 24), torch.randn(50)
    expected = torch.nn.functional.linear(x, weight)
    got = weight_major(x, weight, block)
    assert got.shape == (rows, 1, 50)
    assert torch.allclose(got, expected, atol=1e-5)
    with_bias = Linear(weight, bias)(x)
    assert torch.allclose(with_bias, expected + bias, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "llama-gqa", "qwen2"])
def test_bf16_engine_logprobs_stay_well_inside_the_parity_threshold(name: str) -> None:
    """In bf16 the decoder and the model's forward round differently (fused matmuls, another
    attention kernel): each sample's mean gap stays a fraction of `rollout.parityThreshold`'s
    default (0.1), which the parity probe holds every weight sync to."""
    model = model_named(name).to(torch.bfloat16)
    engine = TrainerEngine(model.config, [EOS], torch.device("cpu"), torch.bfloat16, 64)
    engine.load(live_state(model) or {})
    assert isinstance(engine.decoder, LlamaDecoder)
    groups = engine.generate(prompts(4), Sampling(n=3, max_tokens=10, temperature=1.0, seed=7))
    for sample in (s for g in groups for s in g):
        gap = (torch.tensor(sample.logprobs) - forward_logprobs(model, sample)).abs()
        assert float(gap.mean()) < 0.03 and float(gap.max()) < 0.15, gap


def test_greedy_decoding_follows_the_forward_argmax() -> None:
    model = model_named("llama-gqa")
    [[sample]] = engine_for(model).generate(
        [prompts(1)[0]], Sampling(n=1, max_tokens=12, temperature=0.0)
    )
    ids = list(sample.prompt_ids)
    for token in sample.response_ids:  # naive: one full forward per token
        with torch.no_grad():
            expected = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        assert token == expected
        ids.append(token)


def test_samples_stop_after_eos_and_say_why() -> None:
    model = tiny("llama")
    with torch.no_grad():  # make EOS likely, so that some samples stop early
        model.lm_head.weight[EOS].copy_(model.lm_head.weight.mean(0) + 0.3)
    groups = engine_for(model).generate(prompts(6), Sampling(n=4, max_tokens=16, seed=1,
                                                             temperature=1.0))  # fmt: skip
    reasons = collections.Counter()
    for sample in (s for g in groups for s in g):
        reasons[sample.finish_reason] += 1
        assert len(sample.response_ids) == len(sample.logprobs)
        if sample.finish_reason == "stop":
            assert sample.response_ids[-1] == EOS and EOS not in sample.response_ids[:-1]
        else:
            assert len(sample.response_ids) == 16 and EOS not in sample.response_ids
    assert reasons["stop"] > 0 and reasons["length"] > 0, reasons


def test_a_seed_reproduces_a_call_and_another_seed_differs() -> None:
    engine = engine_for(model_named("llama"))
    sampling = Sampling(n=4, max_tokens=8, temperature=1.0, seed=3)

    def responses(s: Sampling) -> list[tuple[int, ...]]:
        return [x.response_ids for g in engine.generate(prompts(3), s) for x in g]

    first = responses(sampling)
    assert responses(sampling) == first
    assert responses(Sampling(n=4, max_tokens=8, temperature=1.0, seed=4)) != first
    assert len(set(first)) > 1  # the n samples of a prompt are not copies of one another


def test_batches_of_prompts_number_their_samples_in_call_order() -> None:
    model = model_named("llama")
    one_batch = engine_for(model, per_batch=64).generate(prompts(5), Sampling(
        n=2, max_tokens=6, temperature=0.0))  # fmt: skip
    two_at_a_time = engine_for(model, per_batch=2).generate(prompts(5), Sampling(
        n=2, max_tokens=6, temperature=0.0))  # fmt: skip
    assert [[s.prompt_index for s in g] for g in two_at_a_time] == [[i, i] for i in range(5)]
    assert [[s.response_ids for s in g] for g in two_at_a_time] == [
        [s.response_ids for s in g] for g in one_batch
    ]  # greedy: the batching does not change a single token


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_frequencies_match_the_target_distribution(
    temperature: float, top_p: float
) -> None:
    """Inverse-CDF sampling against the distribution written out naively: softmax(z / T), keep
    the most likely tokens until their mass reaches top_p, renormalise."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits[0] / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += probs[i]
    target = [probs[i] / mass if i in kept else 0.0 for i in range(len(probs))]
    draws = 40000
    sampling = Sampling(n=1, max_tokens=1, temperature=temperature, top_p=top_p)
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_tokens(logits.expand(draws, -1).clone(), sampling, generator)
    counts = torch.bincount(tokens, minlength=len(probs)).double() / draws
    for got, want in zip(counts.tolist(), target, strict=True):
        assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / draws) + 1e-9, (counts, target)
    raw = torch.log_softmax(logits[0], -1)  # logprobs are the model's, before T and top-p
    assert torch.allclose(logprobs, raw[tokens], atol=1e-6)


def test_nucleus_keeps_the_smallest_set_that_reaches_top_p() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]])
    assert nucleus(probs, 0.7).tolist() == [[0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 0.25, 0.5]]
    assert nucleus(probs, 0.4).tolist() == [[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]
    assert nucleus(probs, 0.75).tolist() == [[0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 0.25, 0.5]]


def test_a_zero_probability_token_is_never_sampled() -> None:
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 1.0]]).expand(5000, -1).clone()
    tokens, _ = sample_tokens(logits, Sampling(n=1, max_tokens=1, temperature=1.0),
                              torch.Generator().manual_seed(0))  # fmt: skip
    assert set(tokens.tolist()) <= {1, 3}


def test_the_probe_rescores_its_first_greedy_answer_with_new_weights() -> None:
    model = model_named("llama")
    engine = engine_for(model)
    prompt = prompts(1)[0]
    first = engine.probe(prompt, 8, "trainer")
    again = engine.probe(prompt, 8, "trainer")
    assert again.response_ids == first.response_ids
    assert torch.allclose(torch.tensor(again.logprobs), torch.tensor(first.logprobs), atol=1e-5)
    with torch.no_grad():  # one "optimizer step", then the sync that follows it
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    engine.load(live_state(model) or {})
    moved = engine.probe(prompt, 8, "trainer")
    assert moved.response_ids == first.response_ids  # the same tokens, teacher-forced
    assert torch.allclose(torch.tensor(moved.logprobs), forward_logprobs(model, moved), atol=2e-5)
    assert not torch.allclose(torch.tensor(moved.logprobs), torch.tensor(first.logprobs))


def test_scoring_a_sample_matches_the_forward_for_the_fallback_decoder_too() -> None:
    model = model_named("llama-dynamic-rope")
    decoder = build_decoder(model.config, live_state(model) or {}, torch.device("cpu"),
                            torch.float32)  # fmt: skip
    assert isinstance(decoder, HFDecoder)
    sample = Sample(0, tuple(prompts(1)[0]), (5, 9, 11, EOS), (0.0,) * 4, "stop")
    scored = score_sample(decoder, sample, torch.device("cpu"))
    assert torch.allclose(torch.tensor(scored.logprobs), forward_logprobs(model, sample), atol=2e-5)


def test_a_live_engine_shares_the_policy_tensors_and_sees_optimizer_steps() -> None:
    model = model_named("llama")
    engine = engine_for(model)
    assert isinstance(engine.decoder, LlamaDecoder)
    assert engine.decoder.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fused_decoder_is_used_only_where_it_is_exact() -> None:
    assert fused_supported(model_named("qwen2").config, {})
    assert not fused_supported(model_named("llama-dynamic-rope").config, {})
    assert not fused_supported(tiny("llama", hidden_act="gelu").config, {})
    mlp_bias = {"model.layers.0.mlp.down_proj.bias": torch.zeros(1)}
    assert not fused_supported(model_named("llama").config, mlp_bias)


def test_engine_refuses_to_generate_before_its_first_weights() -> None:
    engine = TrainerEngine(model_named("llama").config, [EOS], torch.device("cpu"),
                           torch.float32, 8)  # fmt: skip
    with pytest.raises(RolloutError, match="no weights yet"):
        engine.generate([[5, 6]], Sampling(n=1, max_tokens=2, temperature=0.0))
    with pytest.raises(RolloutError, match="no weights yet"):
        engine.probe([5, 6], 2, "trainer")


def test_engine_refuses_samples_whose_logprobs_are_not_numbers() -> None:
    """As a server reply with a NaN logprob is refused (`rollout.parse_sample`): a policy whose
    weights went NaN gives a RolloutError, not samples that train on garbage."""
    model = model_named("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(RolloutError, match="not a finite number"):
        engine_for(model).generate(prompts(2), Sampling(n=2, max_tokens=4, temperature=1.0))


def test_engine_sync_loads_the_unsharded_policy_without_a_collective() -> None:
    from rlhf_trainer.runtime.distributed import DistContext

    model = model_named("llama")
    engine = TrainerEngine(model.config, [EOS], torch.device("cpu"), torch.float32, 8)
    ctx = DistContext(0, 1, 0, torch.device("cpu"), False)
    EngineSync(engine, ctx, torch.float32).sync(model, step=1)  # no process group needed
    [[sample]] = engine.generate([[5, 6, 7]], Sampling(n=1, max_tokens=4, temperature=0.0))
    assert torch.allclose(torch.tensor(sample.logprobs), forward_logprobs(model, sample),
                          atol=2e-5)  # fmt: skip


def test_a_skipped_engine_sync_is_caught_by_the_parity_probe(ctx: Any) -> None:
    """The optimizer moves the policy in place; the decoder shares most tensors but holds its
    own fused q/k/v and gate/up copies, so without the sync after the step it samples from
    stale weights, and the probe must say so. After the sync the gap is float rounding."""
    from rlhf_trainer.online.parity import Syncer
    from rlhf_trainer.rollout.weight_sync import WeightSyncError

    model = model_named("llama")
    engine = TrainerEngine(model.config, [EOS], torch.device("cpu"), torch.float32, 8)
    syncer = Syncer(EngineSync(engine, ctx, torch.float32), engine, prompts(1)[0], 0.01, ctx, 0)
    assert syncer.sync(model, step=0)["logprob_mismatch_mean"] < 1e-5
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    with pytest.raises(WeightSyncError, match="parity probe failed on trainer"):
        syncer.check(model)
    assert syncer.sync(model, step=1)["logprob_mismatch_mean"] < 1e-5


def split_cost(buckets: list[list[int]], lengths: list[int], cost: tuple[float, float],
               overhead: float) -> float:  # fmt: skip
    widths = [max(lengths[i] for i in b) for b in buckets]
    return sum(len(b) * (cost[0] * w + cost[1] * w * w) + overhead
               for b, w in zip(buckets, widths, strict=True))  # fmt: skip


def test_prefill_buckets_are_the_cheapest_split_by_length() -> None:
    """Against every split of the length-sorted rows into contiguous runs (brute force)."""
    cost = (100.0, 1.0)
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(1, 8, (1,), generator=gen))
        lengths = torch.randint(1, 60, (n,), generator=gen).tolist()
        overhead = float(torch.randint(0, 6000, (1,), generator=gen))
        got = prefill_buckets(lengths, cost, overhead)
        assert sorted(i for b in got for i in b) == list(range(n))
        assert all(b == sorted(b) for b in got)
        widths = [max(lengths[i] for i in b) for b in got]
        assert widths == sorted(widths)  # shortest bucket first
        order = sorted(range(n), key=lambda i: lengths[i])
        splits = [
            [order[a:b] for a, b in itertools.pairwise([0, *cuts, n])]
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
        ]
        cheapest = min(split_cost(split, lengths, cost, overhead) for split in splits)
        assert split_cost(got, lengths, cost, overhead) == pytest.approx(cheapest), trial


def test_prefill_buckets_keep_equal_lengths_together_and_weigh_the_overhead() -> None:
    cost = (100.0, 1.0)
    assert prefill_buckets([7, 7, 7], cost, 0.0) == [[0, 1, 2]]
    assert prefill_buckets([40, 5, 41, 6], cost, 0.0) == [[1], [3], [0], [2]]
    assert prefill_buckets([40, 5, 41, 6], cost, 1000.0) == [[1, 3], [0, 2]]
    assert prefill_buckets([40, 5, 41, 6], cost, 10.0**9) == [[0, 1, 2, 3]]
