"""An Ollama ``Modelfile`` whose TEMPLATE renders the same prompt text as the training chat template.

Ollama formats prompts with a Go ``text/template``, not the model's Jinja chat template, so a GGUF served by Ollama
is prompted the way the Modelfile says — a mismatch with training is a silent quality loss. tunesmith does not
translate Jinja (it is a programming language); it knows the Go templates of common families and picks the one
that renders exactly what the model's own chat template renders on probe conversations, checked by evaluating the
Go template (the subset these templates use: text, ``{{ .Field }}``, ``range``, ``if``/``else if``/``else``,
``eq``, and ``{{-``/``-}}`` trimming). When no family matches, the Modelfile carries no TEMPLATE and the result
says so: Ollama then guesses from the GGUF's embedded template, which the user must check.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_text_atomic


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    """Go template; ``{bos}`` / ``{eos}`` stand for the tokenizer's BOS / EOS text."""
    stops: tuple[str, ...]
    """Stop strings (end-of-turn markers); those in the tokenizer's vocabulary are written as PARAMETER stop."""


FAMILIES: tuple[Family, ...] = (
    Family("chatml",
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
           ("<|im_end|>", "<|endoftext|>")),
    Family("llama3",
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
           ("<|eot_id|>", "<|end_of_text|>")),
    Family("gemma",
           '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
           "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
           ("<end_of_turn>",)),
    Family("phi3",
           "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
           ("<|end|>", "<|endoftext|>")),
    Family("mistral",
           '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
           '{{ else if eq .Role "assistant" }}{{ .Content }}{eos}{{ end }}{{ end }}',
           ("</s>",)),
)
"""Go templates of common chat-template families (the shapes Ollama's own library uses for these models)."""

PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Hello!\nHow are you?"},),
    ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}),
    ({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3? Answer with {\"n\": 6}."}),
    ({"role": "system", "content": "You answer in SQL."}, {"role": "user", "content": "All rows."},
     {"role": "assistant", "content": "SELECT * FROM t;"}, {"role": "user", "content": "Only ids."}),
)
"""Conversations a template must render identically (all end in a user turn + generation prompt, as served)."""


@dataclass(frozen=True)
class TemplateMatch:
    family: str | None
    template: str | None
    """The Go template written to the Modelfile (placeholders filled), or None when no family matched."""
    stops: tuple[str, ...]
    unsupported_roles: tuple[str, ...]
    """Roles the model's own chat template refuses (e.g. ``system`` for Gemma): Ollama would render them anyway."""
    bos_from_runtime: bool
    """The chat template writes the BOS text itself; llama.cpp / Ollama add BOS as a token instead."""
    default_system: str | None = None
    """The system message the chat template inserts when a conversation has none (SmolLM2, Qwen2.5 do). Written as
    the Modelfile's ``SYSTEM``, which Ollama puts first in every conversation that brings no system message."""


def match_template(tokenizer: Any) -> TemplateMatch:
    """The known family whose Go template renders every probe exactly like ``tokenizer``'s chat template.

    Tried with the template's leading BOS text removed (the runtime adds BOS as a token: Llama 3) and kept (a BOS
    that is the first header token, as SmolLM2's ``<|im_start|>``, is written by the template and not added)."""
    vocab = tokenizer.get_vocab()
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    rendered, refused = _render_probes(tokenizer)
    starts_with_bos = bool(bos) and bool(rendered) and all(text.startswith(bos) for text in rendered.values())
    variants = [({k: v[len(bos):] for k, v in rendered.items()}, True)] if starts_with_bos else []
    variants.append((rendered, False))
    for family in FAMILIES:
        template = family.template.replace("{bos}", bos).replace("{eos}", eos)
        for texts, stripped in variants:
            default_system = _default_system(template, texts)
            if texts and all(render_go(template, _go_data(_with_system(PROBES[i], default_system))) == text
                             for i, text in texts.items()):
                stops = tuple(s for s in family.stops if s in vocab) or ((eos,) if eos else ())
                return TemplateMatch(family.name, template, stops, refused, stripped, default_system)
    stops = tuple(sorted({s for f in FAMILIES for s in f.stops if s in vocab} | ({eos} if eos else set())))
    return TemplateMatch(None, None, stops, refused, starts_with_bos)


def render_for(match: TemplateMatch, messages: Sequence[dict[str, Any]]) -> str:
    """What Ollama sends the model for ``messages`` under ``match`` (for tests and for showing users): the
    Modelfile's SYSTEM first when the conversation has no system message, as Ollama does."""
    if match.template is None:
        raise ValueError("no template")
    return render_go(match.template, _go_data(_with_system(messages, match.default_system)))


def write_modelfile(path: str | Path, gguf_name: str, match: TemplateMatch) -> Path:
    """``FROM ./<gguf>``, the TEMPLATE (when a family matched) and one ``PARAMETER stop`` per end-of-turn marker."""
    out = Path(path)
    lines = [f"# Written by tunesmith. Create the Ollama model with: ollama create NAME -f {out.name}"]
    if match.family:
        lines.append(f"# Chat template family: {match.family} (renders the same prompt text as the training template)")
    else:
        lines.append("# The training chat template matched no known family: no TEMPLATE is set, so Ollama guesses it")
        lines.append("# from the GGUF metadata. Check `ollama show NAME --template` against the training template.")
    lines.append(f"FROM ./{gguf_name}")
    if match.template is not None:
        if '"""' in match.template:
            raise ValueError('template contains """')
        lines.append(f'TEMPLATE """{match.template}"""')
    if match.default_system is not None and system_fits_modelfile(match.default_system):
        lines.append("# The chat template's own default system message, used when a request brings none:")
        lines.append(f'SYSTEM """{match.default_system}"""')
    for stop in match.stops:
        lines.append(f'PARAMETER stop "{_quote(stop)}"')
    write_text_atomic(out, "\n".join(lines) + "\n")
    return out


def system_fits_modelfile(text: str) -> bool:
    """A Modelfile's ``SYSTEM \"\"\"…\"\"\"`` cannot hold three quotes in a row or end with a quote."""
    return '"""' not in text and not text.endswith('"')


def read_modelfile(path: str | Path) -> dict[str, Any]:
    """FROM, TEMPLATE and stop parameters of a Modelfile written by ``write_modelfile``."""
    text = Path(path).read_text(encoding="utf-8")
    template = re.search(r'^TEMPLATE """(.*?)"""', text, flags=re.S | re.M)
    source = re.search(r"^FROM (.+)$", text, flags=re.M)
    system = re.search(r'^SYSTEM """(.*?)"""', text, flags=re.S | re.M)
    stops = [_unquote(s) for s in re.findall(r'^PARAMETER stop "((?:[^"\\]|\\.)*)"$', text, flags=re.M)]
    return {"from": source.group(1) if source else None, "template": template.group(1) if template else None,
            "stops": stops, "system": system.group(1) if system else None}


def _render_probes(tokenizer: Any) -> tuple[dict[int, str], tuple[str, ...]]:
    rendered: dict[int, str] = {}
    refused: set[str] = set()
    for i, probe in enumerate(PROBES):
        try:
            rendered[i] = tokenizer.apply_chat_template(list(probe), tokenize=False, add_generation_prompt=True)
        except Exception:
            refused |= {m["role"] for m in probe if m["role"] != "user" and m["role"] != "assistant"}
    return rendered, tuple(sorted(refused))


_SYSTEM_MARK = "\x00tunesmith-system\x00"


def _default_system(template: str, rendered: dict[int, str]) -> str | None:
    """The system message the chat template added to the first probe that has none, if it added one: found by
    rendering the Go template with a marked system message and reading what stands at the mark in the real text."""
    for i, text in rendered.items():
        if PROBES[i][0]["role"] == "system":
            continue
        marked = render_go(template, _go_data(_with_system(PROBES[i], _SYSTEM_MARK)))
        before, _, after = marked.partition(_SYSTEM_MARK)
        if text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after):
            return text[len(before):len(text) - len(after)]
        return None
    return None


def _with_system(messages: Sequence[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    if system is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def _go_data(messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"Messages": [{"Role": m["role"], "Content": m.get("content") or ""} for m in messages]}


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


# --- the Go text/template subset ------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def render_go(template: str, data: dict[str, Any]) -> str:
    """Evaluate ``template`` (the subset described in the module docstring) on ``data``; ValueError otherwise."""
    tokens = _lex(template)
    body, rest = _parse(tokens, 0, ())
    if rest != len(tokens):
        raise ValueError(f"unexpected {{{{ {tokens[rest][1]} }}}}")
    return _run(body, data, data)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with ``{{-`` / ``-}}`` whitespace trimming applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    if trim_next:
        tail = tail.lstrip()
    if tail:
        out.append(("text", tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[Any], int]:
    nodes: list[Any] = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split(" ", 1)[0]
        if word in stop or value.startswith("else"):
            return nodes, i
        if word == "range":
            body, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", value[len("range"):].strip(), body))
            i += 1
        elif word == "if":
            branches = []
            cond = value[len("if"):].strip()
            while True:
                body, i = _parse(tokens, i + 1, ("end",))
                branches.append((cond, body))
                action = tokens[i][1]
                if action == "end":
                    break
                if action.startswith("else if "):
                    cond = action[len("else if "):].strip()
                elif action == "else":
                    cond = None
                else:
                    raise ValueError(f"unsupported action {{{{ {action} }}}}")
            nodes.append(("if", branches))
            i += 1
        else:
            nodes.append(("out", value))
            i += 1
    if stop:
        raise ValueError("missing {{ end }}")
    return nodes, i


def _run(nodes: list[Any], dot: Any, root: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_value(node[1], dot, root)))
        elif node[0] == "range":
            for item in _value(node[1], dot, root) or []:
                out.append(_run(node[2], item, root))
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or _truthy(_condition(cond, dot, root)):
                    out.append(_run(body, dot, root))
                    break
    return "".join(out)


def _condition(expr: str, dot: Any, root: dict[str, Any]) -> Any:
    parts = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', expr)
    if parts and parts[0] == "eq":
        values = [_value(p, dot, root) for p in parts[1:]]
        return len(values) >= 2 and any(values[0] == v for v in values[1:])
    if len(parts) == 1:
        return _value(parts[0], dot, root)
    raise ValueError(f"unsupported condition {expr!r}")


def _value(expr: str, dot: Any, root: dict[str, Any]) -> Any:
    if expr.startswith('"'):
        return _unquote(expr[1:-1])
    if expr.startswith("$."):
        return root.get(expr[2:], "")
    if expr.startswith("."):
        return dot.get(expr[1:], "") if isinstance(dot, dict) else ""
    raise ValueError(f"unsupported expression {expr!r}")


def _truthy(value: Any) -> bool:
    return bool(value)
