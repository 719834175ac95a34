"""Training examples: read the prepared split(s), render with the chat template, tokenise with labels.

Examples longer than ``max_length`` are dropped (default), truncated, or refused — and counted, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat import IGNORE_INDEX, TokenizedChat, segments, tokenize_chat
from ..errors import UserError, where


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair as the DPO loss sees it: the prompt followed by each answer, rendered and tokenised as
    for supervised training, with only the answer supervised (earlier assistant turns of the prompt are context)."""

    chosen: TokenizedChat
    rejected: TokenizedChat
    reference: tuple[float, float] | None = None
    """Summed log-probabilities of the chosen and rejected answers under the reference model, where they were
    computed once before training (full fine-tuning); None where the reference runs in each step (adapters off)."""


@dataclass(frozen=True)
class TokenizedSplit:
    examples: list[TokenizedChat] | list[PreferencePair]
    dropped_overlong: int = 0
    truncated: int = 0
    dropped_unsupervised: int = 0
    source: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def split_paths(dataset: str | None) -> tuple[Path, Path | None]:
    """(train, eval-or-None) files of ``train.dataset``: a prepared folder or a single JSONL file."""
    from ..data.prepare import prepared_files

    if not dataset:
        raise UserError("train.dataset is not set",
                        hint="point it at a folder from `tunesmith data prepare` or a chat JSONL file")
    return prepared_files(dataset)


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, canonical record) for each example: any supported format, validated by the data stage;
    structural problems are one UserError listing file:line: field: reason."""
    from ..data import read_numbered

    return read_numbered(path)


def tokenize_split(path: Path, tokenizer: Any, max_length: int, overlong: str) -> TokenizedSplit:
    examples: list[TokenizedChat] = []
    dropped = truncated = unsupervised = 0
    for lineno, record in read_records(path):
        try:
            chat = tokenize_chat(tokenizer, record["messages"], record.get("tools"))
        except UserError as exc:
            raise UserError(f"{where(path, lineno)}: {exc.message}", hint=exc.hint) from None
        except (KeyError, TypeError) as exc:
            raise UserError(f"{where(path, lineno, 'messages')}: malformed message ({exc})",
                            hint="run `tunesmith data prepare` to validate the file") from None
        if len(chat.input_ids) > max_length:
            if overlong == "error":
                raise UserError(f"{where(path, lineno)}: {len(chat.input_ids)} tokens, over train.max_length "
                                f"{max_length}", hint="raise train.max_length or set train.overlong: drop")
            if overlong == "drop":
                dropped += 1
                continue
            chat = TokenizedChat(chat.input_ids[:max_length], chat.labels[:max_length])
            truncated += 1
        if chat.num_supervised == 0:
            unsupervised += 1
            continue
        examples.append(chat)
    lengths = sorted(len(e.input_ids) for e in examples)
    stats = {
        "examples": len(examples),
        "tokens": sum(lengths),
        "supervised_tokens": sum(e.num_supervised for e in examples),
        "max_tokens": lengths[-1] if lengths else 0,
        "median_tokens": lengths[len(lengths) // 2] if lengths else 0,
    }
    return TokenizedSplit(examples, dropped, truncated, unsupervised, str(path), stats)


def tokenize_preferences(path: Path, tokenizer: Any, max_length: int, overlong: str) -> TokenizedSplit:
    """The preference pairs of a file (``train.objective: dpo``). A pair with either sequence over ``max_length``
    is dropped, truncated (both sequences, keeping the start) or refused as a whole, never half kept."""
    from ..data import read_numbered

    pairs: list[PreferencePair] = []
    dropped = truncated = unsupervised = 0
    for lineno, record in read_numbered(path, preference=True):
        prompt = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in record["input"]["messages"]]
        tools = record["input"].get("tools")
        try:
            chosen, rejected = (tokenize_chat(tokenizer, [*prompt, *record[key]], tools)
                                for key in ("preferred_output", "non_preferred_output"))
        except UserError as exc:
            raise UserError(f"{where(path, lineno)}: {exc.message}", hint=exc.hint) from None
        longest = max(len(chosen.input_ids), len(rejected.input_ids))
        if longest > max_length:
            if overlong == "error":
                raise UserError(f"{where(path, lineno)}: {longest} tokens, over train.max_length {max_length}",
                                hint="raise train.max_length or set train.overlong: drop")
            if overlong == "drop":
                dropped += 1
                continue
            chosen, rejected = (TokenizedChat(c.input_ids[:max_length], c.labels[:max_length])
                                for c in (chosen, rejected))
            truncated += 1
        if chosen.num_supervised == 0 or rejected.num_supervised == 0:
            unsupervised += 1
            continue
        pairs.append(PreferencePair(chosen, rejected))
    lengths = sorted(len(c.input_ids) for p in pairs for c in (p.chosen, p.rejected))
    stats = {
        "examples": len(pairs),
        "tokens": sum(lengths),
        "supervised_tokens": sum(c.num_supervised for p in pairs for c in (p.chosen, p.rejected)),
        "max_tokens": lengths[-1] if lengths else 0,
        "median_tokens": lengths[len(lengths) // 2] if lengths else 0,
    }
    return TokenizedSplit(pairs, dropped, truncated, unsupervised, str(path), stats)


def inspect_example(config: Any, index: int) -> dict[str, Any]:
    """One training example as the model sees it: text pieces with their supervision flag (for the CLI)."""
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    train_path, _ = split_paths(config.train.dataset)
    for i, (lineno, record) in enumerate(read_records(train_path)):
        if i == index:
            try:
                segs = segments(tokenizer, record["messages"], record.get("tools"))
            except UserError as exc:
                raise UserError(f"{where(train_path, lineno)}: {exc.message}", hint=exc.hint) from None
            chat = tokenize_chat(tokenizer, record["messages"], record.get("tools"))
            return {
                "file": str(train_path), "line": lineno,
                "segments": [(s.text, s.supervised) for s in segs],
                "num_tokens": len(chat.input_ids),
                "num_supervised": sum(1 for x in chat.labels if x != IGNORE_INDEX),
            }
    raise UserError(f"{train_path}: has no example {index}", hint="use a smaller --index")
