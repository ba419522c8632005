"""Chat rows (`format: chat`, TRL's conversational shape), rendered with the policy's template.

A row holds lists of `{role, content}` messages. Rendering turns them into the same prompt and
response strings the other formats give, so every stage reads them unchanged:
- a prompt is the template's rendering of the messages with the generation prompt;
- a response is what the template adds after that prompt for one assistant message, up to
  and including the end-of-turn token (e.g. "Paris.<|im_end|>"), so a trained model learns to
  end its turn; what the template writes after that token (a newline) is never generated;
- a multi-turn SFT row also trains its earlier assistant turns: `SFTRow.trained_spans` are
  their character spans in the prompt.

The prompt of every assistant turn must be a prefix of the whole rendering (true of ChatML,
Llama-3, Mistral and most templates); a template that rewrites earlier turns is refused.
Row shapes (`NEEDS["chat"]`):
- SFT: `{"messages": [...]}` (every assistant turn trained) or `{"prompt": [...],
  "completion": [...]}`;
- preference: `{"prompt": [...], "chosen": [...], "rejected": [...]}` with assistant messages,
  or chosen and rejected as whole conversations that share their prompt (ultrafeedback);
- ranked: `{"prompt": [...], "responses": [[...], ...], "rewards": [...]}`;
- prompts: `{"prompt": [...], "answer"?}` or `{"messages": [...]}` (a final assistant
  message becomes the answer).
A string where messages are expected is one user (prompt) or assistant (response) message.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from rlhf_trainer.data.chat_format import ChatFormat, Message
from rlhf_trainer.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
NEEDS_CHAT = (
    'chat rows hold {role, content} message lists: {"messages": [...]}, {"prompt": [...], '
    '"completion": [...]}, {"prompt": [...], "chosen": [...], "rejected": [...]}, '
    '{"prompt": [...], "responses": [[...], ...], "rewards": [...]} or {"prompt": [...]}'
)


def _messages(value: object, field: str, where: str, default_role: str) -> list[Message]:
    """A field's messages, checked; a plain string is one message of `default_role`."""
    if isinstance(value, str):
        return [cast(Message, {"role": default_role, "content": value})]
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{where}: field "{field}" must be a non-empty list of {{role, content}} messages; '
            f"{NEEDS_CHAT}"
        )
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(
                f'{where}: field "{field}[{i}]" must be {{"role": ..., "content": string}}; '
                f"{NEEDS_CHAT}"
            )
        if m.get("role") not in ROLES:
            raise DataError(
                f'{where}: field "{field}[{i}].role" is {m.get("role")!r}; use one of '
                f"{', '.join(ROLES)}"
            )
        out.append(cast(Message, {"role": m["role"], "content": m["content"]}))
    return out


def _field(rec: dict[str, Any], field: str, where: str) -> object:
    if field not in rec:
        raise DataError(f'{where}: missing field "{field}"; {NEEDS_CHAT}')
    return rec[field]


def _reply(messages: list[Message], field: str, where: str) -> Message:
    """The one non-empty assistant message a response field must be."""
    last = messages[-1]
    if len(messages) != 1 or last["role"] != "assistant" or not last["content"].strip():
        raise DataError(
            f'{where}: field "{field}" must be one non-empty assistant message (got '
            f"{len(messages)} messages, the last a {last['role']!r} one); {NEEDS_CHAT}"
        )
    return last


def _prompt(messages: list[Message], field: str, where: str) -> list[Message]:
    if messages[-1]["role"] == "assistant":
        raise DataError(
            f'{where}: field "{field}" ends with an assistant message; a prompt ends with the '
            "user's (or a tool's) turn"
        )
    return messages


class Renderer:
    """Prompt and response strings of messages, with one template."""

    def __init__(self, chat: ChatFormat) -> None:
        if chat.template is None:
            raise DataError(
                "dataset.format: chat data needs the model's chat template, and the model has "
                "none (no chat_template in tokenizer_config.json or chat_template.jinja); use "
                "an instruct model, add a template to its tokenizer, or use format jsonl"
            )
        self.chat = chat

    def prompt(self, messages: Sequence[Message]) -> str:
        return self.chat.render(list(messages), add_generation_prompt=True, keep_bos=True)

    def reply(self, prompt: Sequence[Message], reply: Message, where: str) -> tuple[str, str]:
        """(rendered prompt, rendered response) of one assistant turn after `prompt`."""
        head = self.prompt(prompt)
        whole = self.chat.render([*prompt, reply], add_generation_prompt=False, keep_bos=True)
        if not whole.startswith(head):
            raise DataError(
                f"{where}: the chat template renders an assistant turn that does not continue "
                "the rendered prompt, so the prompt/response token boundary is not exact; use "
                "a template whose rendering of a conversation extends that of its prompt"
            )
        response = whole[len(head) :].rstrip()
        if not response:
            raise DataError(f"{where}: the chat template rendered an empty assistant turn")
        return head, response

    def conversation(
        self, messages: list[Message], where: str
    ) -> tuple[str, str, list[tuple[int, int]]]:
        """(prompt before the last assistant turn, that turn, spans of earlier assistant turns
        in the prompt): a whole conversation trained on every assistant turn."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns or turns[-1] != len(messages) - 1:
            raise DataError(
                f'{where}: field "messages" must end with an assistant message (the turn to '
                f"learn); {NEEDS_CHAT}"
            )
        spans: list[tuple[int, int]] = []
        for i in turns:
            if not messages[i]["content"].strip():
                raise DataError(f'{where}: field "messages[{i}]" is an empty assistant turn')
            head, response = self.reply(messages[:i], messages[i], where)
            spans.append((len(head), len(head) + len(response)))
        prompt, response = self.reply(messages[:-1], messages[-1], where)
        return prompt, response, spans[:-1]


def sft_messages(rec: dict[str, Any], where: str) -> list[Message]:
    """An SFT row's whole conversation: `messages`, or `prompt` + `completion`."""
    if "messages" in rec:
        return _messages(rec["messages"], "messages", where, "user")
    prompt = _prompt(
        _messages(_field(rec, "prompt", where), "prompt", where, "user"), "prompt", where
    )
    reply = _reply(
        _messages(_field(rec, "completion", where), "completion", where, "assistant"),
        "completion",
        where,
    )
    return [*prompt, reply]


def pair_messages(rec: dict[str, Any], where: str) -> tuple[list[Message], Message, Message]:
    """(prompt, chosen reply, rejected reply) of a preference row."""
    chosen = _messages(_field(rec, "chosen", where), "chosen", where, "assistant")
    rejected = _messages(_field(rec, "rejected", where), "rejected", where, "assistant")
    if len(chosen) > 1 or len(rejected) > 1:  # whole conversations that start with the prompt
        if chosen[:-1] != rejected[:-1]:
            raise DataError(
                f'{where}: fields "chosen" and "rejected" are conversations with different '
                "prompts; they must differ only in their last (assistant) message"
            )
        prompt = _prompt(chosen[:-1], "chosen", where)
        return (
            prompt,
            _reply(chosen[-1:], "chosen", where),
            _reply(rejected[-1:], "rejected", where),
        )
    prompt = _prompt(
        _messages(_field(rec, "prompt", where), "prompt", where, "user"), "prompt", where
    )
    return prompt, _reply(chosen, "chosen", where), _reply(rejected, "rejected", where)


def ranked_messages(rec: dict[str, Any], where: str) -> tuple[list[Message], list[Message]]:
    """(prompt, one assistant reply per response) of a ranked row."""
    prompt = _prompt(
        _messages(_field(rec, "prompt", where), "prompt", where, "user"), "prompt", where
    )
    responses = _field(rec, "responses", where)
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f'{where}: field "responses" must list at least 2 responses; {NEEDS_CHAT}')
    replies = [
        _reply(_messages(r, f"responses[{i}]", where, "assistant"), f"responses[{i}]", where)
        for i, r in enumerate(responses)
    ]
    return prompt, replies


def prompt_messages(rec: dict[str, Any], where: str) -> tuple[list[Message], str | None]:
    """(prompt, reference answer or None) of a prompt row."""
    if "prompt" not in rec and "messages" in rec:
        messages = _messages(rec["messages"], "messages", where, "user")
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            return messages[:-1], messages[-1]["content"]
        return _prompt(messages, "messages", where), None
    prompt = _prompt(
        _messages(_field(rec, "prompt", where), "prompt", where, "user"), "prompt", where
    )
    answer = rec.get("answer")
    if isinstance(answer, list):
        answer = _reply(_messages(answer, "answer", where, "assistant"), "answer", where)["content"]
    if answer is not None and not isinstance(answer, str):
        raise DataError(f'{where}: field "answer" must be a string or an assistant message')
    return prompt, answer


def hh_messages(prompt: str) -> list[Message]:
    """An HH-RLHF prompt ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:") as turns."""
    body = prompt.removesuffix("\n\nAssistant:")
    out: list[Message] = []
    for part in body.split("\n\n"):
        role = (
            "user"
            if part.startswith("Human:")
            else "assistant"
            if part.startswith("Assistant:")
            else None
        )
        if role is None and out:  # a paragraph break inside a turn
            out[-1]["content"] += "\n\n" + part
            continue
        text = part.split(":", 1)[1].strip() if role else part.strip()
        out.append(cast(Message, {"role": role or "user", "content": text}))
    return [m for m in out if m["content"] or m["role"] == "user"]


MARK = "\x00reply\x00"


def end_of_turn(template: str | None, eos_token: str = "") -> str | None:
    """The text a template writes right after an assistant message (its end-of-turn token,
    e.g. "<|im_end|>", "<|eot_id|>"), or None when it writes nothing there."""
    if not template:
        return None
    chat = ChatFormat(template, eos_token=eos_token)
    conversation: list[Message] = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": MARK},
    ]
    try:
        text = chat.render(conversation, add_generation_prompt=False, keep_bos=True)
    except Exception:  # a template that refuses this minimal chat marks no end of turn
        return None
    tail = text.partition(MARK)[2].split()
    return tail[0] if tail else None
