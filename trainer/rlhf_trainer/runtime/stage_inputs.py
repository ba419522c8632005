"""The record of the inputs that decide a stage's result, and the check that a re-run matches it.

A stage writes `<outputDir>/inputs.json` when it starts from nothing, and `final/` carries a copy.
A later run of the same stage compares its own inputs with that record before it trains: if the
stage has a checkpoint or a `final/` and any input differs, it stops with a `UserError` (exit
status 2) that names the stage and every changed field, rather than resuming old weights under new
settings or reporting an old result as the new one. Outputs written before records existed are
used as they are, with a warning.

The record (`RECORD_VERSION`):
- `fields`: the stage config (the StageConfig the trainer reads, camelCase paths as in the YAML)
  flattened to `path -> value`, without `IGNORED_FIELDS` and without leaves named in
  `IGNORED_KEYS`: bookkeeping, output locations, server addresses and client timeouts, which
  differ between runs and do not change the weights.
- `files`: for every field that names a file or folder (`FILE_KEYS`, and `policies.*`):
  a file's sha256; for a folder with a record (a stage's `final/`) the sha256 of that record,
  so a change upstream reaches every stage after it; for any other folder (a base model) a digest
  of its top-level files' names, sizes and modification times.
Torch-free, like preflight: it runs before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from rlhf_trainer.config import StageConfig, resolve_path
from rlhf_trainer.errors import UserError

log = logging.getLogger(__name__)

RECORD_FILE = "inputs.json"
RECORD_VERSION = 1
FINAL_DIR = "final"
# Fields that cannot change the result: names and the output folder (they pick the record, so
# are the same whenever one is compared) and how often progress and checkpoints are written.
IGNORED_FIELDS = frozenset(
    {
        "run",
        "stage",
        "outputDir",
        "hyperparameters.logEvery",
        "hyperparameters.saveEvery",
        "hyperparameters.keepCheckpoints",
    }
)
# Leaves ignored wherever they sit: server addresses (local ports change every run), client
# timeouts and retries, request concurrency, and which Secret holds a hub token.
IGNORED_KEYS = frozenset(
    {
        "urls",
        "timeoutSeconds",
        "maxRetries",
        "startupTimeoutSeconds",
        "concurrency",
        "tokenSecretRef",
    }
)
# Leaves that name a file or folder whose contents are an input.
FILE_KEYS = frozenset({"path", "evalPath", "rewardModelPath"})
# Must match rlhf_operator.restart.REFUSAL_MARK: `rlhf run` exits 2 on a stage failed this way.
REFUSAL_MARK = "the stage's inputs changed since"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 1 << 20


class InputsChanged(UserError):
    """A stage's inputs differ from those its checkpoint or final output was trained on."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a.b.c -> leaf`; lists and scalars are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return out


def counted(path: str) -> bool:
    """Whether the field at `path` decides the stage's result."""
    return path not in IGNORED_FIELDS and path.rsplit(".", 1)[-1] not in IGNORED_KEYS


def names_file(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in FILE_KEYS or path.startswith("policies.")


def file_identity(path: Path) -> str:
    """What stands for the contents of the file or folder at `path` (see the module doc)."""
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    if not path.is_dir():
        return "missing"
    record = _record_path(path)
    if record is not None:
        return f"record:{hashlib.sha256(record.read_bytes()).hexdigest()}"
    stamps = sorted(
        f"{f.name}:{st.st_size}:{st.st_mtime_ns}"
        for f in path.iterdir()
        if f.is_file() and not f.name.startswith(".")
        for st in [f.stat()]
    )
    return f"stamps:{hashlib.sha256(chr(10).join(stamps).encode()).hexdigest()}"


def _record_path(folder: Path) -> Path | None:
    """A stage's record for its output `folder`: inside it, or beside it for a `final/`."""
    for candidate in (folder / RECORD_FILE, folder.parent / RECORD_FILE):
        if candidate.is_file() and (candidate.parent == folder or folder.name == FINAL_DIR):
            return candidate
    return None


def stage_record(config: StageConfig) -> dict[str, Any]:
    """The record of the inputs that decide `config`'s result."""
    fields = {k: v for k, v in flatten(config.dump()).items() if counted(k)}
    files = {
        key: file_identity(resolve_path(value))
        for key, value in fields.items()
        if names_file(key) and isinstance(value, str)
    }
    return {"version": RECORD_VERSION, "fields": fields, "files": files}


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One entry per input that differs: `field old -> new`, or `field: the file changed`."""
    out = []
    old_fields, new_fields = old.get("fields", {}), new.get("fields", {})
    for key in sorted(set(old_fields) | set(new_fields)):
        before, after = old_fields.get(key), new_fields.get(key)
        if before != after:
            out.append(f"{key} {_show(before)} -> {_show(after)}")
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for key in sorted(set(old_files) & set(new_files)):
        if old_files[key] != new_files[key] and old_fields.get(key) == new_fields.get(key):
            out.append(f"{key}: the contents of {new_fields.get(key)} changed")
    return out


def trained_output(output_dir: Path) -> str | None:
    """What the stage has trained already: its final output, its newest checkpoint, or None."""
    if (output_dir / FINAL_DIR).is_dir():
        return "its final output"
    root = output_dir / "checkpoints"
    steps = (
        sorted(
            int(m.group(1))
            for child in root.iterdir()
            if (m := _STEP_DIR.match(child.name)) and child.is_dir()
        )
        if root.is_dir()
        else []
    )
    return f"its checkpoint step-{steps[-1]}" if steps else None


def read_record(output_dir: Path) -> dict[str, Any] | None:
    """The stage's record, or None where there is none (or none this version can read)."""
    for path in (output_dir / RECORD_FILE, output_dir / FINAL_DIR / RECORD_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("version") == RECORD_VERSION:
            return record
    return None


def check_stage_inputs(config: StageConfig, record: dict[str, Any]) -> bool:
    """Refuse (InputsChanged) to go on from outputs trained on other inputs. Returns whether
    the record should be written: when nothing is trained yet, or old outputs have none."""
    out = resolve_path(config.output_dir)
    trained = trained_output(out)
    if trained is None:
        return True
    old = read_record(out)
    if old is None:
        log.warning(
            "%s: found %s in %s with no record of the inputs it was trained on (written before "
            "stages recorded them); used it as it is, and recorded the current inputs; rerun "
            "with --restart %s to train it again",
            config.stage,
            trained,
            out,
            config.stage,
        )
        return True
    found = changes(old, record)
    if found:
        raise InputsChanged(
            f"{config.stage}: {REFUSAL_MARK} {trained} in {out}: {', '.join(found)}; rerun "
            f"with `rlhf run FILE --restart {config.stage}` to train it again from the start "
            "(on a cluster: move that folder aside), or undo the change"
        )
    return False


def write_record(output_dir: Path, record: dict[str, Any]) -> Path:
    """Write `<output_dir>/inputs.json` atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RECORD_FILE
    tmp = path.with_name(f".{RECORD_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def guard_outputs(config: StageConfig, rank: int) -> None:
    """Before a stage trains: refuse changed inputs (every rank, so every rank exits 2), then
    rank 0 records the inputs the outputs about to be written come from."""
    record = stage_record(config)
    if check_stage_inputs(config, record) and rank == 0:
        write_record(resolve_path(config.output_dir), record)
