"""A tiny, seeded Llama model and BPE tokenizer for tests and local runs.

The model is a random-init `LlamaForCausalLM` (2 layers, hidden 128, 2 heads of dim 64: vLLM's CPU
attention rejects head dims below 32, so 64 keeps the model servable). The tokenizer is a byte-level
BPE trained on `tasks.corpus()`, so it ships inside the package and needs no download. The same seed
gives byte-identical files.

`preset="20m"` keeps the tokenizer but widens and deepens the model to ~20M parameters
(6 layers, hidden 512, 8 heads of dim 64), for benchmarks where the tiny model is too small
for the per-step compute to outweigh per-step overheads.

`preset="judge"` is the tiny model with a larger vocabulary (BPE asked for 768 tokens finds 720),
the base of the judge that an `sft` stage teaches the task (examples/rlaif-tiny.yaml): with that
many merges every animal sound is one token, so the judge compares its own answer with each
response token for token (with 512 tokens a sound is 2-5 of them, and the judge learned less:
docs/BENCHMARKS.md, "AI feedback").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rlhf_trainer.tasks import animal_sounds as tasks

log = logging.getLogger(__name__)

VOCAB_SIZE = 512
PRESET_VOCAB_SIZES: dict[str, int] = {"judge": 768}  # presets whose vocabulary is not VOCAB_SIZE
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# Preset -> the LlamaConfig fields that set the model's size.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2},
    "20m": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6,
            "num_attention_heads": 8, "num_key_value_heads": 8},
}  # fmt: skip
PRESETS["judge"] = PRESETS["tiny"]


def build_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> object:
    """A byte-level BPE trained on the task corpus, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tasks.corpus(seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama's tokenizer: encoding a text adds BOS, so prompts look the same everywhere.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def portable_tokenizer_config(path: Path) -> None:
    """transformers 5 saves a generic fast tokenizer as TokenizersBackend, which 4.x (and so
    older vLLM images) cannot load; PreTrainedTokenizerFast loads in both."""
    conf = json.loads(path.read_text())
    if conf.get("tokenizer_class") not in (None, "TokenizersBackend"):
        return
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def build_tiny_model(out_dir: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Write the tiny model (or another size of `PRESETS`) and tokenizer to `out_dir` (created
    if needed) and return it."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out_dir)
    tokenizer = build_tokenizer(seed, PRESET_VOCAB_SIZES.get(preset, VOCAB_SIZE))
    vocab = len(tokenizer)  # type: ignore[arg-type]
    size: dict[str, Any] = dict(PRESETS[preset])  # Any: LlamaConfig's keywords differ in type
    config = LlamaConfig(
        vocab_size=vocab,
        **size,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )
    torch.manual_seed(seed)
    # Typed as Any: whether its __init__ is annotated differs between transformers releases.
    llama: Any = LlamaForCausalLM
    model = llama(config)
    out.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    portable_tokenizer_config(out / "tokenizer_config.json")
    for f in out.iterdir():  # save_pretrained may write 0600 files; servers run as other users
        f.chmod(0o644)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("Wrote %s model (%d parameters, vocab %d) to %s", preset, n_params, vocab, out)
    return out
