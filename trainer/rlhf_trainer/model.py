"""Loading the initial model and tokenizer, and writing the final one in Hugging Face format."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rlhf_trainer.config import ModelSource
from rlhf_trainer.distributed import DistContext, barrier
from rlhf_trainer.errors import UserError
from rlhf_trainer.tiny import portable_tokenizer_config

log = logging.getLogger(__name__)


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
    try:
        config = AutoConfig.from_pretrained(ref, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model: cannot load a causal LM from {ref} ({err}); check the model"
        ) from None
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    model.config.use_cache = False
    return model, saved if isinstance(saved, torch.dtype) else torch.float32


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final`; an older `final` is moved aside first and deleted after."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_hf(
    model: nn.Module, state: dict[str, Any], tokenizer: Any, out: Path, dtype: torch.dtype
) -> None:
    """save_pretrained of a plain copy of `model` holding the gathered full `state`."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    config = model.config
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    plain.to(dtype)
    plain.config.use_cache = True
    plain.save_pretrained(out, safe_serialization=True)
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
) -> Path:
    """Collective: gather the full state dict to rank 0 (on CPU), which writes
    `<output_dir>/<name>/` in Hugging Face format, atomically (temp folder, then rename)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    final = output_dir / name
    if ctx.is_main:
        tmp = output_dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_hf(model, state, tokenizer, tmp, dtype)
        _replace_dir(tmp, final)
        log.info("Wrote %s (Hugging Face format, %s)", final, str(dtype).removeprefix("torch."))
    barrier()
    return final
