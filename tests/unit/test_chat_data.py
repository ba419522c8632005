"""Chat-format rows rendered with a policy's own template (SmolLM2's ChatML, a Llama-3 style
template and one with a default system prompt): the rendering is `apply_chat_template`'s, the
prompt/response boundary is exact, the loss covers the assistant turns and nothing else, and bad
rows are refused naming the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from rlhf_trainer.algos.losses import IGNORE_INDEX
from rlhf_trainer.config import DatasetSpec, ModelSource
from rlhf_trainer.data.batching import stop_ids, tokenize_pairs, tokenize_sft
from rlhf_trainer.data.chat_data import end_of_turn
from rlhf_trainer.data.chat_format import ChatFormat, load_chat_format
from rlhf_trainer.data.readers import (
    dataset_chat,
    load_preference_rows,
    load_prompt_rows,
    load_ranked_rows,
    load_sft_rows,
)
from rlhf_trainer.errors import DataError

pytestmark = pytest.mark.unit

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '### System: Answer well.\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant: ' + message['content'] + eos_token + '\n' }}{% else %}"
    "{{ '### ' + message['role'] | capitalize + ': ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant: ' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module", params=["smollm2", "llama3", "system"])
def tokenizer(request: pytest.FixtureRequest, smollm2: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(smollm2)
    if request.param == "llama3":
        added = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok.add_special_tokens({"additional_special_tokens": added})
        tok.chat_template = LLAMA3
    elif request.param == "system":
        tok.chat_template = SYSTEM
    return tok


def chat_of(tok: Any) -> ChatFormat:
    return ChatFormat(tok.chat_template, tok.bos_token or "", tok.eos_token or "")


def write(tmp_path: Path, rows: list[Any]) -> DatasetSpec:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DatasetSpec(path=str(path), format="chat")


def test_rendering_is_apply_chat_template(tokenizer: Any, tmp_path: Path) -> None:
    rows = load_sft_rows(write(tmp_path, [{"messages": CONVERSATION}]), chat_of(tokenizer))
    whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:-1], tokenize=False, add_generation_prompt=True
    )
    assert rows[0].prompt == prompt
    assert whole.startswith(rows[0].prompt + rows[0].response)
    assert whole[len(rows[0].prompt + rows[0].response) :].strip() == ""  # only a newline after


def test_loss_covers_every_assistant_turn_and_its_end(tokenizer: Any, tmp_path: Path) -> None:
    rows = load_sft_rows(write(tmp_path, [{"messages": CONVERSATION}]), chat_of(tokenizer))
    (example,) = tokenize_sft(rows, tokenizer, 512)
    # The ids are those of the whole rendered conversation: the boundary is the tokenizer's own.
    whole = tokenizer(rows[0].prompt + rows[0].response, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(whole)] == whole
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True)
               if label != IGNORE_INDEX]  # fmt: skip
    end = end_of_turn(tokenizer.chat_template, tokenizer.eos_token)
    assert end is not None
    expected = "".join(m["content"] + end for m in CONVERSATION if m["role"] == "assistant")
    assert tokenizer.decode(trained).replace(" ", "") == expected.replace(" ", "")
    masked = [t for t, label in zip(example.input_ids, example.labels, strict=True)
              if label == IGNORE_INDEX]  # fmt: skip
    assert "France" in tokenizer.decode(masked) and "Paris" not in tokenizer.decode(masked)


def test_trained_tokens_are_exactly_the_response(tokenizer: Any, tmp_path: Path) -> None:
    """prompt + completion: the trained tokens spell the response (end of turn included) and
    the masked ones the prompt, whatever the tokenizer makes of the text at the boundary."""
    spec = write(tmp_path, [{"prompt": CONVERSATION[:-1], "completion": CONVERSATION[-1:]}])
    (row,) = load_sft_rows(spec, chat_of(tokenizer))
    (example,) = tokenize_sft([row], tokenizer, 512)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True)
               if label != IGNORE_INDEX]  # fmt: skip
    assert tokenizer.decode(trained).strip() == row.response
    assert example.input_ids[-1] in stop_ids(tokenizer)  # ends its turn, no EOS added after it


def test_chatml_prompt_ids_are_a_prefix_of_the_conversation(smollm2: Path, tmp_path: Path) -> None:
    """For SmolLM2's ChatML the parts tokenize as the whole does: the prompt ids generation
    starts from are exactly the trained sequence's. (Not so for every pair of template and
    tokenizer: a GPT-2 pre-tokenizer splits a prompt's trailing "\n\n" or " " differently
    once text follows, which is why training tokenizes the whole conversation.)"""
    tok = AutoTokenizer.from_pretrained(smollm2)
    spec = write(tmp_path, [{"prompt": CONVERSATION[:-1], "completion": CONVERSATION[-1:]}])
    (row,) = load_sft_rows(spec, chat_of(tok))
    (example,) = tokenize_sft([row], tok, 512)
    prompt_ids = tok(row.prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok(row.response, add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + response_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids


def test_preference_shapes_agree(tokenizer: Any, tmp_path: Path) -> None:
    user = [{"role": "user", "content": "Name a colour."}]
    good, bad = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "No."}
    explicit = {"prompt": user, "chosen": [good], "rejected": [bad]}
    whole = {"chosen": [*user, good], "rejected": [*user, bad]}  # ultrafeedback_binarized
    chat = chat_of(tokenizer)
    a = load_preference_rows(write(tmp_path, [explicit]), chat)
    b = load_preference_rows(write(tmp_path, [whole]), chat)
    assert a == b
    ranked = {"prompt": user, "responses": [[good], [bad]], "rewards": [1.0, 0.0]}
    c = load_preference_rows(write(tmp_path, [ranked]), chat)
    assert (c[0].prompt, c[0].chosen, c[0].rejected) == (a[0].prompt, a[0].chosen, a[0].rejected)
    assert load_ranked_rows(write(tmp_path, [ranked]), chat=chat)[0].responses == (
        a[0].chosen,
        a[0].rejected,
    )
    pair = tokenize_pairs(a, tokenizer, 256)[0]
    n = len(tokenizer(a[0].prompt, add_special_tokens=False)["input_ids"])
    # The prompt's last token may merge with the response's first (a template ending in " ").
    assert pair.chosen.input_ids[: n - 1] == pair.rejected.input_ids[: n - 1]


def test_prompt_rows_keep_their_messages(tokenizer: Any, tmp_path: Path) -> None:
    rows = load_prompt_rows(
        write(tmp_path, [{"prompt": CONVERSATION[:-1]}, {"messages": CONVERSATION}]),
        chat_of(tokenizer),
    )
    assert rows[0].prompt == rows[1].prompt
    assert rows[0].chat and rows[0].messages == tuple(CONVERSATION[:-1])
    assert rows[1].answer == "Paris."


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, 'line 1: field "messages[0].role"'),
        ({"messages": "hello"}, "must end with an assistant message"),
        ({"messages": {"role": "user"}}, 'field "messages" must be a non-empty list'),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
            'field "messages[1]" is an empty assistant turn',
        ),
        ({"prompt": [{"role": "user", "content": "x"}]}, 'missing field "completion"'),
        (
            {"prompt": "x", "completion": [{"role": "user", "content": "y"}]},
            'field "completion" must be one non-empty assistant message',
        ),
    ],
)
def test_bad_chat_rows_name_the_file_line_and_field(
    smollm2: Path, tmp_path: Path, row: Any, message: str
) -> None:
    chat = load_chat_format(ModelSource(path=str(smollm2)))
    with pytest.raises(DataError, match=message.replace("[", r"\[")) as err:
        load_sft_rows(write(tmp_path, [row]), chat)
    assert "chat.jsonl line 1" in str(err.value)


def test_skip_invalid_counts_bad_chat_rows(smollm2: Path, tmp_path: Path) -> None:
    chat = load_chat_format(ModelSource(path=str(smollm2)))
    spec = write(tmp_path, [{"messages": [{"role": "robot", "content": "x"}]},
                            {"messages": CONVERSATION}])  # fmt: skip
    rows = load_sft_rows(spec.model_copy(update={"skip_invalid": True}), chat)
    assert len(rows) == 1 and rows.skipped == 1


def test_a_model_without_a_template_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = write(tmp_path, [{"messages": CONVERSATION}])
    chat = dataset_chat(spec, ModelSource(path=str(tiny_model_dir)))
    with pytest.raises(DataError, match="chat data needs the model's chat template"):
        load_sft_rows(spec, chat)


def test_too_long_a_conversation_is_refused_not_cut(tokenizer: Any, tmp_path: Path) -> None:
    rows = load_sft_rows(write(tmp_path, [{"messages": CONVERSATION}]), chat_of(tokenizer))
    with pytest.raises(DataError, match=r"chat.jsonl line 1: .* longer than .*maxLength 16"):
        tokenize_sft(rows, tokenizer, 16)


def test_hh_rows_become_chat_turns(smollm2: Path, tmp_path: Path) -> None:
    path = tmp_path / "hh.jsonl"
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Sky colour?\n\nAssistant: Blue.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Sky colour?\n\nAssistant: No.",
    }
    path.write_text(json.dumps(row) + "\n")
    source = ModelSource(path=str(smollm2))
    spec = DatasetSpec(path=str(path), format="hh")
    (pair,) = load_preference_rows(spec, dataset_chat(spec, source))
    assert pair.chat and pair.chosen == "Blue.<|im_end|>"
    assert pair.prompt.endswith("<|im_start|>user\nSky colour?<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nHello.<|im_end|>" in pair.prompt
    raw = spec.model_copy(update={"apply_chat_template": False})
    assert dataset_chat(raw, source) is None  # the switch keeps the transcript as it is


@pytest.mark.parametrize(
    ("template", "eos", "expected"),
    [(LLAMA3, "", "<|eot_id|>"), (SYSTEM, "</s>", "</s>"), (None, "", None)],
)
def test_end_of_turn(template: str | None, eos: str, expected: str | None) -> None:
    assert end_of_turn(template, eos) == expected


def test_stop_ids_include_the_end_of_turn(smollm2: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_ids(tok)


def test_judge_rendering_keeps_a_chatml_bos(smollm2: Path) -> None:
    """SmolLM2 names <|im_start|> its BOS: a judge prompt keeps it (no server adds it back),
    while a template's one-off BOS is dropped for the server to add."""
    chat = load_chat_format(ModelSource(path=str(smollm2)))
    assert chat.bos_token == "<|im_start|>"
    assert chat.render(CONVERSATION[:2]).startswith("<|im_start|>system\nBe brief.")
    llama = ChatFormat(LLAMA3, bos_token="<|begin_of_text|>")
    assert llama.render(CONVERSATION[:2]).startswith("<|start_header_id|>system")
