"""Loading the initial model and tokenizer, and writing the final one in Hugging Face format.

A stage's starting folder may also be a LoRA adapter written with `lora.merge: false`; it is
loaded on top of its base model and merged. The final model is written by an `Exporter`: a
function from the gathered full state dict to the Hugging Face model to save (a causal LM by
default; a sequence classifier for reward models; merged or adapter-only with LoRA).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rlhf_trainer.config import LoRAOptions, ModelSource, StageConfig
from rlhf_trainer.errors import UserError
from rlhf_trainer.models import lora
from rlhf_trainer.models.tiny import portable_tokenizer_config
from rlhf_trainer.runtime.distributed import DistContext, barrier, shard_model
from rlhf_trainer.runtime.stage_inputs import RECORD_FILE

log = logging.getLogger(__name__)

# Full state dict (gathered on rank 0) -> the Hugging Face model (or PEFT adapter) to save.
Exporter = Callable[[dict[str, Any]], nn.Module]


def _hub_kwargs(source: ModelSource) -> dict[str, Any]:
    if source.name is None:
        return {}
    return {"revision": source.revision, "token": os.environ.get("HF_TOKEN") or None}


def load_tokenizer(source: ModelSource, ref: str) -> Any:
    """The tokenizer, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **_hub_kwargs(source))
    except (OSError, ValueError) as err:
        raise UserError(
            f"model: cannot load a tokenizer from {ref} ({err}); check the model"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: ModelSource, ref: str) -> tuple[nn.Module, torch.dtype]:
    """The model in float32 (master weights) and the dtype its checkpoint was saved in."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    kwargs = _hub_kwargs(source)
    adapter = ref if lora.is_adapter_dir(Path(ref)) else None
    base = lora.adapter_base(Path(ref)) if adapter else ref
    try:
        config = AutoConfig.from_pretrained(base, **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kwargs)
        if adapter:
            model = lora.load_merged(model, adapter)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model: cannot load a causal LM from {ref} ({err}); check the model"
        ) from None
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    model.config.use_cache = False
    return model, saved if isinstance(saved, torch.dtype) else torch.float32


def load_trainable_lm(
    config: StageConfig, model_ref: str, ctx: DistContext
) -> tuple[nn.Module, torch.dtype, Exporter]:
    """The policy to train: the causal LM, with LoRA adapters when `lora` is set, sharded with
    FSDP2; the dtype to save it in; and its exporter (merged or adapter-only with LoRA)."""
    model, saved_dtype = load_causal_lm(config.model, model_ref)
    export = causal_lm_exporter(model.config, config.lora, model_ref)
    if config.lora is not None:
        model = lora.apply_lora(model, config.lora)
    model.train()
    shard_model(model, ctx.bf16)
    return model, saved_dtype, export


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final`; an older `final` is moved aside first and deleted after."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def exporter(
    build: Callable[[], nn.Module],
    options: LoRAOptions | None = None,
    base_ref: str = "",
    rename: Callable[[str], str] = str,
) -> Exporter:
    """An Exporter: `build()` (run on the meta device) makes the plain model, LoRA adapters are
    added as in training when `options` is set, and the state's keys pass through `rename`."""

    def export(state: dict[str, Any]) -> nn.Module:
        plain: Any
        with torch.device("meta"):
            plain = build()
            if options is not None:
                plain = lora.apply_lora(plain, options)
        plain.load_state_dict({rename(k): v for k, v in state.items()}, assign=True)
        if options is not None:
            plain = lora.export_lora(plain, options, base_ref)
        if hasattr(plain, "tie_weights"):
            plain.tie_weights()
        out: nn.Module = plain
        return out

    return export


def causal_lm_exporter(
    config: Any, options: LoRAOptions | None = None, base_ref: str = ""
) -> Exporter:
    """A causal LM of `config` (e.g. `model.config` of the trained model)."""

    def build() -> nn.Module:
        import transformers

        return transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call,no-any-return]

    return exporter(build, options, base_ref)


def _write_hf(plain: nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype) -> None:
    """save_pretrained of the exported model and the tokenizer."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model: Any = plain.to(dtype)
    model.config.use_cache = True
    generation = getattr(model, "generation_config", None)
    if generation is not None:  # built from the training config, which turned the cache off
        generation.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if (out / "tokenizer_config.json").is_file():
        portable_tokenizer_config(out / "tokenizer_config.json")
    for f in out.iterdir():  # save_pretrained may write 0600 files; servers run as other users
        f.chmod(0o644)


def save_final(
    model: nn.Module,
    tokenizer: Any,
    output_dir: Path,
    ctx: DistContext,
    dtype: torch.dtype,
    name: str = "final",
    export: Exporter | None = None,
) -> Path:
    """Collective: gather the full state dict to rank 0 (on CPU), which writes
    `<output_dir>/<name>/` in Hugging Face format, atomically (temp folder, then rename).
    `export` turns the state into the model to save; default: a causal LM like `model`."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    final = output_dir / name
    if ctx.is_main:
        tmp = output_dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        export = export or causal_lm_exporter(model.config)
        _write_hf(export(state), tokenizer, tmp, dtype)
        record = output_dir / RECORD_FILE  # the inputs it was trained on travel with it
        if record.is_file():
            shutil.copy2(record, tmp / RECORD_FILE)
        _replace_dir(tmp, final)
        log.info("Wrote %s (Hugging Face format, %s)", final, str(dtype).removeprefix("torch."))
    barrier()
    return final
