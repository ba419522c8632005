"""The tiny model: deterministic from its seed, servable shape, tokenizer that round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_trainer.models.tiny import build_tiny_model
from rlhf_trainer.tasks import animal_sounds as tasks

pytestmark = pytest.mark.unit


def test_same_seed_gives_identical_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny_model_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_other_seed_gives_other_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", seed=1)
    a = (tiny_model_dir / "model.safetensors").read_bytes()
    assert a != (other / "model.safetensors").read_bytes()


def test_shape_and_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["head_dim"] == 64  # vLLM's CPU attention rejects small head dims
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"]
    assert 256 < config["vocab_size"] <= 1000
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer) == config["vocab_size"]
    ex = tasks.unique_examples(0, 1)[0]
    ids = tokenizer(ex.prompt + ex.response)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == config["bos_token_id"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == ex.prompt + ex.response
    assert tokenizer.pad_token_id == config["pad_token_id"] != tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    for path in tiny_model_dir.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path  # readable by a server's user


def test_judge_preset_gives_every_sound_one_token(tmp_path: Path) -> None:
    """The judge's base: the tiny shape with a larger vocabulary, in which each animal sound is
    a single token (in the tiny model's own, each is 2-5)."""
    from transformers import AutoTokenizer

    judge = build_tiny_model(tmp_path / "judge", preset="judge")
    config = json.loads((judge / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 2)
    tokenizer = AutoTokenizer.from_pretrained(judge)
    lengths = {
        s: len(tokenizer(f" {s}", add_special_tokens=False)["input_ids"])
        for s in tasks.SOUNDS.values()
    }
    assert set(lengths.values()) == {1}, lengths
