"""LoRA through PEFT: wrap a model's linear layers with low-rank adapters, and write the result.

Only the adapters (and, for a reward model, its score head) train; the base weights stay frozen.
FSDP2 shards a PEFT model like any other (per-parameter sharding handles frozen and trainable
parameters in one unit), on CPU with gloo as on GPUs. The final model is written by rank 0 from the
gathered full state dict: rebuilt on the meta device with the same adapters, then either merged
into plain weights (`lora.merge`, the default: any later stage or server loads it) or saved as a
PEFT adapter folder that names its base model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_trainer.config import LoRAOptions

if TYPE_CHECKING:  # torch-free at import: preflight asks `is_adapter_dir` before torch loads
    from torch import nn

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def peft_config(options: LoRAOptions, task_type: str | None = None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules or "all-linear",
        task_type=task_type,
    )


def apply_lora(model: nn.Module, options: LoRAOptions, task_type: str | None = None) -> nn.Module:
    """`model` wrapped in a PeftModel with fresh adapters; only the adapters require grad."""
    from peft import get_peft_model

    wrapped: nn.Module = get_peft_model(model, peft_config(options, task_type))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("Added LoRA adapters (r=%d): %d of %d parameters train", options.r, trainable, total)
    return wrapped


def export_lora(replica: nn.Module, options: LoRAOptions, base_ref: str) -> nn.Module:
    """A rebuilt PeftModel holding the trained weights -> what to save: the merged plain model,
    or (merge false) the PeftModel itself, whose save_pretrained writes the adapter only."""
    peft_model: Any = replica
    if options.merge:
        merged: nn.Module = peft_model.merge_and_unload()
        return merged
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = base_ref
    return replica


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path: Path) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json)."""
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    return str(base or "")


def load_merged(model: nn.Module, adapter_dir: str) -> nn.Module:
    """`model` (the adapter's base) with the adapter in `adapter_dir` merged into its weights."""
    from peft import PeftModel

    wrapped: Any = PeftModel.from_pretrained(model, adapter_dir)
    merged: nn.Module = wrapped.merge_and_unload()
    return merged
