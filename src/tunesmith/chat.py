"""Chat rendering and assistant-only label masking, shared by data, train and eval.

The model's own chat template renders the conversation. Supervision is found by rendering prefixes:
for assistant message i, everything between ``render(messages[:i], add_generation_prompt=True)`` and
``render(messages[:i+1])`` is that turn — its content AND its end-of-turn token (a model trained without the
end-of-turn token never learns to stop). Trailing whitespace after the end-of-turn stays unsupervised.

Message contents are tokenised with ``split_special_tokens=True``: a user who writes ``<|im_end|>`` in a message gets
the characters, never the control token. Template text (headers, end-of-turn markers) is tokenised normally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UserError

IGNORE_INDEX = -100
"""Label value that the loss ignores (PyTorch's cross-entropy default)."""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text: template or message content, trained on or not."""

    text: str
    content: bool
    supervised: bool


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The chat template applied to ``messages`` as text (no tokenisation)."""
    if not messages and not add_generation_prompt:
        return ""
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if tools:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template([_template_message(m) for m in messages], **kwargs)
    except ValueError as exc:
        if "chat_template" in str(exc) or "chat template" in str(exc):
            raise UserError("the model has no chat template",
                            hint="set model.chat_template to a Jinja template (text or a .jinja file)") from None
        raise


def segments(tokenizer: Any, messages: Sequence[dict[str, Any]],
             tools: list[dict[str, Any]] | None = None) -> list[Segment]:
    """Split the rendered conversation into template/content pieces with their supervision flag."""
    out: list[Segment] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg.get("role") == "assistant":
            head = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
            _check_prefix(done, head, i)
            out += _split_content(head[len(done):], None, supervised=False)
            full = render(tokenizer, messages[: i + 1], tools=tools)
            _check_prefix(head, full, i)
            turn = full[len(head):]
            body = turn.rstrip()
            trained = _weight(msg) == 1
            out += _split_content(body, msg.get("content"), supervised=trained)
            if len(body) < len(turn):
                out.append(Segment(turn[len(body):], content=False, supervised=False))
            done = full
        else:
            full = render(tokenizer, messages[: i + 1], tools=tools)
            _check_prefix(done, full, i)
            out += _split_content(full[len(done):], msg.get("content"), supervised=False)
            done = full
    return [s for s in out if s.text]


def tokenize_chat(tokenizer: Any, messages: Sequence[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None) -> TokenizedChat:
    """Token ids and labels (IGNORE_INDEX outside supervised assistant turns) for one conversation."""
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments(tokenizer, messages, tools):
        piece = tokenizer(seg.text, add_special_tokens=False, split_special_tokens=seg.content)["input_ids"]
        ids += piece
        labels += piece if seg.supervised else [IGNORE_INDEX] * len(piece)
    return TokenizedChat(ids, labels)


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]],
               tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of ``messages`` followed by the generation prompt: what a model is given at inference.
    Tokenised exactly as in training (same segmentation), so train and serve see the same tokens."""
    head = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    ids: list[int] = []
    done = ""
    for seg in segments(tokenizer, messages, tools):
        ids += tokenizer(seg.text, add_special_tokens=False, split_special_tokens=seg.content)["input_ids"]
        done += seg.text
    tail = head[len(done):] if head.startswith(done) else head
    if tail:
        ids += tokenizer(tail, add_special_tokens=False)["input_ids"]
    return ids


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn (generation stops at any of them)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and name in tokenizer.get_vocab():
            ids.add(tid)
    return sorted(ids)


def _weight(msg: dict[str, Any]) -> int:
    weight = msg.get("weight", 1)
    return 1 if weight is None else int(weight)


def _template_message(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "weight"}


def _check_prefix(prefix: str, text: str, index: int) -> None:
    if not text.startswith(prefix):
        raise UserError(
            f"the chat template is not prefix-stable at message {index + 1}: rendering more messages changed the "
            "text of earlier ones, so assistant turns cannot be located for loss masking",
            hint="set model.chat_template to a template that renders each message independently")


def _split_content(text: str, content: Any, supervised: bool) -> list[Segment]:
    """Mark the message's own content inside its rendered text, so it is tokenised as plain text."""
    if isinstance(content, str) and content:
        at = text.find(content)
        if at >= 0:
            return [Segment(text[:at], False, supervised), Segment(content, True, supervised),
                    Segment(text[at + len(content):], False, supervised)]
    return [Segment(text, False, supervised)]
