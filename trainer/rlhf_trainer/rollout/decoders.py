"""Forward passes with a KV cache, for generation inside the trainer (`rollout/engine.py`).

A `Decoder` runs a causal LM over a left-padded prompt batch once (`prefill`), can repeat each
row's cache `n` times (`fork`: the samples of a prompt share its prompt pass), then takes one
token per row at a time (`decode`). Two implementations:

- `LlamaDecoder`, for the Llama family (`llama`, `mistral` without a sliding window in reach,
  `qwen2`): the decoder layers written out over the checkpoint's own tensors, q/k/v and
  gate/up fused into one matmul each, a preallocated cache written in place, and no per-step
  mask building. The prompt pass runs in buckets of similar lengths (`prefill_buckets`), so
  short prompts are not padded to the longest one; a decode step attends with two batched
  matmuls over the cache. On a 2-CPU machine it decodes the tiny model about 2.5x faster than
  the same model's Hugging Face forward (docs/BENCHMARKS.md, "Online RL").
- `HFDecoder`, any other causal LM: the model's own forward with a `DynamicCache`.

Both are built from a full state dict (the trainer's gathered weights) and the model config,
and compute what the trainer's forward computes: a test holds their logprobs to the training
forward's within float rounding, and the parity probe checks it again after every weight sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_trainer.data.packed import config_row_cost, width_cost

FUSED_TYPES = frozenset({"llama", "mistral", "qwen2"})
# What one more prompt-pass bucket costs a layer beyond its tokens' FLOPs (the fixed costs of a
# layer's dozen ops, ~0.3 ms on a 2-CPU machine), in FLOPs: ~8 tokens' worth on the 20m
# bench model, ~150 on the tiny test one, whose passes are all overhead.
BUCKET_FLOPS = 5e7


class Decoder(Protocol):
    def prefill(
        self, ids: torch.Tensor, real: torch.Tensor, capacity: int, every: bool = False
    ) -> torch.Tensor:
        """Run the prompts: ids (B, P) left-padded, real (B, P) bool (False on padding), room
        for `capacity` tokens per row in all. Returns the next-token logits (B, V) float32;
        with `every`, the logits at every position (B, P, V)."""
        ...

    def fork(self, n: int) -> None:
        """Repeat every row's cache n times (row i becomes rows i*n .. i*n+n-1)."""
        ...

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """One token per row: tokens, positions (B,) int64; visible (B, S) bool over every
        cached column plus this one. Returns the next-token logits (B, V) float32."""
        ...


def prompt_positions(real: torch.Tensor) -> torch.Tensor:
    """0, 1, ... over each row's real tokens, as the training forward numbers them."""
    return (real.long().cumsum(dim=1) - 1).clamp(min=0)


def prefill_mask(real: torch.Tensor) -> torch.Tensor:
    """(B, 1, P, P) bool: causal over real keys; a padding query sees itself (no empty row)."""
    width = real.size(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    mask = causal.unsqueeze(0) & real.unsqueeze(1)
    eye = torch.eye(width, dtype=torch.bool, device=real.device)
    return (mask | eye.unsqueeze(0)).unsqueeze(1)


def prefill_buckets(
    lengths: Sequence[int], cost: tuple[float, float], overhead: float
) -> list[list[int]]:
    """The rows of a prompt batch in buckets of similar length, each to run as one pass padded
    to its longest prompt: the split of the rows, by length, that costs the fewest estimated
    FLOPs (`cost` = per token and per token pair, as `packed.row_cost`; `overhead` per
    bucket). Shortest bucket first; rows in order within each."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ends = [k + 1 for k in range(len(order)) if k + 1 == len(order) or
            lengths[order[k]] != lengths[order[k + 1]]]  # fmt: skip
    # best[j]: the cheapest split of the first ends[j] rows (sorted), and where its last
    # bucket starts; buckets break only between different lengths.
    best: list[tuple[float, int]] = []
    for j, end in enumerate(ends):
        row = width_cost(cost, lengths[order[end - 1]])
        options = [((best[i][0] if i >= 0 else 0.0) + (end - (ends[i] if i >= 0 else 0)) * row
                    + overhead, i) for i in range(-1, j)]  # fmt: skip
        best.append(min(options))
    buckets: list[list[int]] = []
    j = len(ends) - 1
    while j >= 0:
        start = ends[best[j][1]] if best[j][1] >= 0 else 0
        buckets.append(sorted(order[start : ends[j]]))
        j = best[j][1]
    return buckets[::-1]


# A decode step's matmuls have one row per sample. On CPU, MKL runs such a short operand
# faster as weight @ x^T than as x @ weight^T (SmolLM2's shapes at 16 rows, 2 cores: 1.1-1.4x
# per layer, and its 49152-row output layer 27 ms against 15 ms in blocks of 2048 rows), so up
# to this many rows the product is taken that way round. Training's hundreds of rows gain
# nothing from it (docs/BENCHMARKS.md, "Online RL on SmolLM2-135M-Instruct").
FEW_ROWS = 64
HEAD_BLOCK = 2048  # output-layer rows per block of a few-row product


def weight_major(x: torch.Tensor, weight: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """x @ weight^T (..., out) as (weight @ x^T)^T on CPU for up to `FEW_ROWS` rows (in blocks of
    `block` weight rows when given), else `F.linear`. The result may be a transposed view."""
    rows = x.numel() // max(x.size(-1), 1)
    if x.device.type != "cpu" or rows > FEW_ROWS:
        return F.linear(x, weight)
    flat = x.reshape(rows, x.size(-1)).t()
    if block is None:
        out = torch.mm(weight, flat)
    else:
        out = torch.empty((weight.size(0), rows), dtype=x.dtype, device=x.device)
        for start in range(0, weight.size(0), block):
            torch.mm(weight[start : start + block], flat, out=out[start : start + block])
    return out.t().reshape(*x.shape[:-1], weight.size(0))


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = weight_major(x, self.weight)
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear  # q, k and v projections stacked: (H + 2 KV) * head_dim outputs
    out: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear  # gate and up projections stacked: 2 * intermediate outputs
    down: Linear


def fused_supported(config: Any, state: dict[str, torch.Tensor]) -> bool:
    """Whether `LlamaDecoder` computes exactly what this model's forward does."""
    if getattr(config, "model_type", None) not in FUSED_TYPES:
        return False
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if any(".mlp." in k and k.endswith(".bias") for k in state):
        return False
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "dynamic" in str(rope.get("rope_type", rope.get("type", ""))):
        return False  # its frequencies depend on the length seen so far
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)
    return window is None or not uses_window or window >= config.max_position_embeddings


class LlamaDecoder:
    """Llama-family decoder layers over a state dict (names as `LlamaForCausalLM` has them)."""

    def __init__(
        self, config: Any, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        def get(name: str) -> torch.Tensor:
            return state[name].to(device=device, dtype=dtype)

        def maybe(name: str) -> torch.Tensor | None:
            return get(name) if name in state else None

        def stacked(prefix: str, names: tuple[str, ...]) -> Linear:
            weight = torch.cat([get(f"{prefix}.{n}.weight") for n in names])
            biases = [maybe(f"{prefix}.{n}.bias") for n in names]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None  # type: ignore[arg-type]
            return Linear(weight, bias)

        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.dtype = dtype
        self.rotary = LlamaRotaryEmbedding(config=config).to(device)
        self.embed = get("model.embed_tokens.weight")
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}"
            self.layers.append(
                Layer(
                    attn_norm=get(f"{p}.input_layernorm.weight"),
                    qkv=stacked(f"{p}.self_attn", ("q_proj", "k_proj", "v_proj")),
                    out=Linear(
                        get(f"{p}.self_attn.o_proj.weight"), maybe(f"{p}.self_attn.o_proj.bias")
                    ),
                    mlp_norm=get(f"{p}.post_attention_layernorm.weight"),
                    gate_up=stacked(f"{p}.mlp", ("gate_proj", "up_proj")),
                    down=Linear(get(f"{p}.mlp.down_proj.weight")),
                )
            )
        self.norm = get("model.norm.weight")
        self.head = get("lm_head.weight") if "lm_head.weight" in state else self.embed  # tied
        self.scale = self.head_dim**-0.5
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.cos = self.sin = self.embed[:0]  # (positions, head_dim) once a prefill set them
        self.filled = 0
        cost = config_row_cost(config)
        self.cost = cost if cost is not None else (1.0, 0.0)
        self.bucket_flops = BUCKET_FLOPS  # what a bucket costs a layer beyond its tokens

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As LlamaRMSNorm: normalise in float32, scale in the model's dtype.
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return weight * normed.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.size(-1) // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
        rows: torch.Tensor | None = None, every: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """ids, positions (B, T). A prompt pass (`rows`: the cache rows it fills, its prompts
        ending at column `filled`) attends over its own tokens, mask (B, 1, T, T) bool; a
        decode step (T = 1, every row) over the cache, mask (B, 1, 1, S) additive over the
        cache up to filled + 1, and advances `filled`. Returns the last position's logits (B, V)
        float32, or with `every` all positions' (B, T, V)."""
        b, t = ids.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)
        # (B, T, 1, d): every head alike
        cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        start, end = (self.filled - t, self.filled) if rows is not None else (
            self.filled, self.filled + 1)  # fmt: skip
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self._rms(x, layer.attn_norm)).reshape(b, t, h + 2 * kv, d)
            qk = self._rotate(qkv[:, :, : h + kv], cos, sin)  # q and k heads in one go
            q = qk[:, :, :h].transpose(1, 2)
            k, v = qk[:, :, h:].transpose(1, 2), qkv[:, :, h + kv :].transpose(1, 2)
            if rows is not None:
                # Columns left of a bucket's width are padding no pass writes: zeros, as the
                # masked-out softmax weights multiply them (uninitialised memory may hold NaN).
                self.keys[i][rows, :, :start] = 0
                self.values[i][rows, :, :start] = 0
                self.keys[i][rows, :, start:end] = k
                self.values[i][rows, :, start:end] = v
                attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                          enable_gqa=h != kv)  # fmt: skip
            else:
                self.keys[i][:, :, start:end] = k
                self.values[i][:, :, start:end] = v
                attended = self._attend_cache(q, i, end, mask)
            x = x + layer.out(attended.transpose(1, 2).reshape(b, t, h * d))
            gate, up = layer.gate_up(self._rms(x, layer.mlp_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if rows is None:
            self.filled = end
        normed = self._rms(x if every else x[:, -1], self.norm)
        return weight_major(normed, self.head, HEAD_BLOCK).float().contiguous()

    def _attend_cache(self, q: torch.Tensor, i: int, end: int, bias: torch.Tensor) -> torch.Tensor:
        """One query per row (B, H, 1, d) over layer i's cache up to `end`, bias (B, 1, 1, S)
        additive: softmax(q k^T * scale + bias) v as two batched matmuls, the query heads of a
        key/value head side by side (grouped-query attention without copying the cache)."""
        b, h, kv, d = q.size(0), self.heads, self.kv_heads, self.head_dim
        keys, values = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        grouped = q.reshape(b, kv, h // kv, d)
        scores = torch.matmul(grouped, keys.transpose(2, 3)) * self.scale + bias
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        return torch.matmul(weights, values).reshape(b, h, 1, d)

    def prefill(
        self, ids: torch.Tensor, real: torch.Tensor, capacity: int, every: bool = False
    ) -> torch.Tensor:
        """With `every`, one pass over the whole (B, P) batch; else a pass per bucket of
        similar prompt lengths (`prefill_buckets`), each padded only to its longest prompt."""
        shape = (ids.size(0), self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.empty(shape, dtype=self.dtype, device=ids.device) for _ in self.layers]
        self.values = [torch.empty_like(k) for k in self.keys]
        # Rotary tables for every position a row can reach (static frequencies only:
        # `fused_supported` leaves dynamic scaling to the model's own forward).
        table = torch.arange(capacity, device=ids.device).unsqueeze(0)
        cos, sin = self.rotary(self.embed[:1], table)
        self.cos, self.sin = cos[0], sin[0]
        width = self.filled = ids.size(1)
        everyone = torch.arange(ids.size(0), device=ids.device)
        if every:
            return self._forward(ids, prompt_positions(real), prefill_mask(real), everyone, True)
        lengths = real.sum(dim=1).tolist()
        logits = torch.empty((ids.size(0), self.head.size(0)), device=ids.device)
        for bucket in prefill_buckets(lengths, self.cost, self.bucket_flops):
            rows = everyone[bucket] if len(bucket) < ids.size(0) else everyone
            cut = width - max(max(lengths[r] for r in bucket), 1)
            part = real[rows, cut:]
            logits[rows] = self._forward(ids[rows, cut:], prompt_positions(part),
                                         prefill_mask(part), rows)  # fmt: skip
        return logits

    def fork(self, n: int) -> None:
        self.keys = [c.repeat_interleave(n, dim=0) for c in self.keys]
        self.values = [c.repeat_interleave(n, dim=0) for c in self.values]

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        bias = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        bias = bias.masked_fill_(~visible, float("-inf"))[:, None, None, :]
        return self._forward(tokens.unsqueeze(1), positions.unsqueeze(1), bias)


class HFDecoder:
    """Any causal LM: its own forward, with a DynamicCache."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache: Any = None

    def prefill(
        self, ids: torch.Tensor, real: torch.Tensor, capacity: int, every: bool = False
    ) -> torch.Tensor:
        from transformers import DynamicCache

        del capacity  # the cache grows
        self.cache = DynamicCache()
        return self._logits(ids, real.long(), prompt_positions(real), every)

    def fork(self, n: int) -> None:
        self.cache.batch_repeat_interleave(n)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        return self._logits(tokens.unsqueeze(1), visible.long(), positions.unsqueeze(1))

    def _logits(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, every: bool = False
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=self.cache, use_cache=True, logits_to_keep=0 if every else 1,
        )  # fmt: skip
        logits: torch.Tensor = out.logits.float() if every else out.logits[:, -1].float()
        return logits


def hf_model(config: Any, state: dict[str, torch.Tensor], device: torch.device,
             dtype: torch.dtype) -> nn.Module:  # fmt: skip
    """The Hugging Face causal LM of `config` over `state`'s tensors (shared, not copied, when
    they are already on `device` in `dtype`), in eval mode. Built on `device` without random
    init, so that buffers the state dict lacks (rotary frequencies) are computed as usual."""
    import transformers
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model: Any = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    missing, _ = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    untied = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if untied:
        raise ValueError(f"the weights lack {', '.join(untied[:3])}")
    model.config.use_cache = True
    result: nn.Module = model.eval()
    return result


def build_decoder(
    config: Any, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Decoder:
    """`LlamaDecoder` where it computes the model exactly, else the model's own forward."""
    if fused_supported(config, state):
        return LlamaDecoder(config, state, device, dtype)
    return HFDecoder(hf_model(config, state, device, dtype))
