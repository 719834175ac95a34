"""Chat rendering and assistant-only label masking, shared by data, train and eval.

The model's own chat template renders the conversation. Supervision is found by rendering prefixes:
for assistant message i, everything between ``render(messages[:i], add_generation_prompt=True)`` and
``render(messages[:i+1])`` is that turn — its content AND its end-of-turn token (a model trained without the
end-of-turn token never learns to stop). Trailing whitespace after the end-of-turn stays unsupervised.
An assistant turn that calls tools is supervised the same way: its rendered calls and its end-of-turn token; the
tool results that answer them (role ``tool``) are not.

Message contents and call arguments are tokenised with ``split_special_tokens=True``: a user who writes
``<|im_end|>`` in a message gets the characters, never the control token. Template text (headers, end-of-turn
markers) is tokenised normally.

A template that fails on a conversation, or renders it without its tool calls, tool results or tool definitions,
is one ``UserError`` naming the message (the callers add the file and line).
"""

from __future__ import annotations

import json
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
    from jinja2 import TemplateError

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
    except (TemplateError, TypeError) as exc:  # the template's own failure: raise_exception(), a missing key
        # jinja's message names the template's variables or its own text, never a message's content
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            raise UserError(f"the chat template cannot render tool calls ({reason})", hint=TOOLS_HINT) from None
        raise UserError(f"the chat template cannot render this conversation ({reason})",
                        hint="set model.chat_template to a template that accepts these roles and this order of "
                             "messages, or change the example") from None


TOOLS_HINT = ("use a model whose chat template supports tools (Qwen2.5, Llama 3.1, Hermes-style templates), or set "
              "model.chat_template to one that renders tools, tool_calls and tool messages")


def segments(tokenizer: Any, messages: Sequence[dict[str, Any]],
             tools: list[dict[str, Any]] | None = None) -> list[Segment]:
    """Split the rendered conversation into template/content pieces with their supervision flag.

    Renders only at assistant turns (and at the end): the messages between two assistant turns are one unsupervised
    piece. Templates may render a message differently depending on the one after it (Qwen2.5 closes a run of tool
    results only after the last of them), so a prefix ending inside such a run need not be a prefix of the whole."""
    out: list[Segment] = []
    done = ""
    since = 0  # first message not yet rendered
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        head = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        _check_prefix(done, head, i)
        out += _between(head[len(done):], messages, since, i)
        full = render(tokenizer, messages[: i + 1], tools=tools)
        _check_prefix(head, full, i)
        turn = full[len(head):]
        _check_calls_rendered(turn, msg, i)
        body = turn.rstrip()
        pieces = [_content_forms(msg), *(_argument_forms(call) for call in msg.get("tool_calls") or [])]
        out += _mark(body, pieces, supervised=_weight(msg) == 1)
        if len(body) < len(turn):
            out.append(Segment(turn[len(body):], content=False, supervised=False))
        done, since = full, i + 1
    if since < len(messages):
        full = render(tokenizer, messages, tools=tools)
        _check_prefix(done, full, len(messages) - 1)
        out += _between(full[len(done):], messages, since, len(messages))
        done = full
    _check_tools_rendered("".join(s.text for s in out if not s.supervised), tools)
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
    """A message as templates expect it: no ``weight``, no null fields, and each call's ``arguments`` as a mapping
    (OpenAI's format stores a JSON string; transformers' tool-use templates expect an object: Qwen2.5 and Llama 3.1
    write ``arguments | tojson``, which would quote the string a second time)."""
    out = {k: v for k, v in msg.items() if k != "weight" and v is not None}
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_template_call(c) for c in out["tool_calls"]]
    return out


def _template_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:  # validation reports it with its line; rendering keeps the text as it is
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call["function"].get("arguments")
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    return value if isinstance(value, dict) else {}


def _check_calls_rendered(turn: str, msg: dict[str, Any], index: int) -> None:
    """Each call of an assistant turn shows in its rendered text (the function's name and the arguments' keys):
    a template that ignores ``tool_calls`` would train the model to answer with an empty turn."""
    for c, call in enumerate(msg.get("tool_calls") or []):
        name = call["function"]["name"]
        if name not in turn or any(key not in turn for key in _arguments(call)):
            raise UserError(f"messages[{index}].tool_calls[{c}]: the chat template does not render tool calls (the "
                            "rendered assistant turn lacks the call's name or arguments)", hint=TOOLS_HINT)


def _check_tools_rendered(prompts: str, tools: list[dict[str, Any]] | None) -> None:
    """Every tool definition shows in the unsupervised text (the model is shown it, wherever the template puts it:
    Llama 3.1 in the first user turn, Mistral before the last): a model trained on calls to tools it was never
    shown learns to call them blind."""
    for t, tool in enumerate(tools or []):
        if tool["function"]["name"] not in prompts:
            raise UserError(f"tools[{t}]: the chat template does not render tool definitions (the tool's name is "
                            "nowhere in the prompt)", hint=TOOLS_HINT)


def _between(text: str, messages: Sequence[dict[str, Any]], start: int, stop: int) -> list[Segment]:
    """The unsupervised text of ``messages[start:stop]`` (no assistant turn among them), each content marked; a
    tool result that is not in the text means the template dropped it."""
    for j in range(start, stop):
        if messages[j].get("role") == "tool" and not any(f in text for f in _content_forms(messages[j])):
            raise UserError(f"messages[{j}]: the chat template does not render tool results (role tool)",
                            hint=TOOLS_HINT)
    return _mark(text, [_content_forms(messages[j]) for j in range(start, stop)], supervised=False)


def _content_forms(msg: dict[str, Any]) -> list[str]:
    """How a message's content may appear in the rendered text: as it is, or JSON-quoted (Llama 3.1 writes tool
    results with ``tojson``)."""
    content = msg.get("content")
    if not isinstance(content, str) or not content:
        return []
    return [content, json.dumps(content, ensure_ascii=False)[1:-1]]


def _argument_forms(call: dict[str, Any]) -> list[str]:
    """How a call's arguments may appear in the rendered turn: as ``tojson`` writes the object, or as the text."""
    arguments = call["function"].get("arguments")
    return [json.dumps(_arguments(call), ensure_ascii=False), *([arguments] if isinstance(arguments, str) else [])]


def _check_prefix(prefix: str, text: str, index: int) -> None:
    if not text.startswith(prefix):
        raise UserError(
            f"the chat template is not prefix-stable at message {index + 1}: rendering more messages changed the "
            "text of earlier ones, so assistant turns cannot be located for loss masking",
            hint="set model.chat_template to a template that renders each message independently")


def _mark(text: str, pieces: Sequence[Sequence[str]], supervised: bool) -> list[Segment]:
    """Mark the users' own text (contents, call arguments) inside rendered text, in order, so it is tokenised as
    plain text; ``pieces``: for each, the forms it may take (the first found is marked; one not found stays
    template text)."""
    out: list[Segment] = []
    for forms in pieces:
        for form in forms:
            at = text.find(form) if form else -1
            if at >= 0:
                out += [Segment(text[:at], False, supervised), Segment(form, True, supervised)]
                text = text[at + len(form):]
                break
    return [*out, Segment(text, False, supervised)]
