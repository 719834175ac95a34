"""Counting a chat dataset for the advisor: examples, tokens (with the target tokenizer when one is available) and
the length distribution that decides padding waste, memory and time.

The file is read by the data stage's reader (``tunesmith.data.read_numbered``): every format ``tunesmith data prepare``
accepts (OpenAI chat, ShareGPT, alpaca, prompt/completion) is counted, and a line it would refuse is refused here with
the same file:line message, because counting it would be a guess. Cleaning (duplicates, quality rules) is not applied:
this counts the file as given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, where
from ..paths import input_file

CHARS_PER_TOKEN = 4.0
"""Without a tokenizer, tokens are estimated from characters (about 4 per token for English BPE vocabularies)."""


@dataclass(frozen=True)
class DatasetStats:
    path: str
    examples: int
    tokenizer: str | None
    """Which tokenizer counted the tokens; None: estimated from characters (CHARS_PER_TOKEN)."""
    total_tokens: int
    supervised_tokens: int
    """Tokens the loss is computed on (assistant turns); estimated as the assistant characters without a tokenizer."""
    mean_tokens: float
    p50_tokens: int
    p90_tokens: int
    p99_tokens: int
    max_tokens: int
    lengths: tuple[int, ...]
    """Every example's length in tokens (for padding-efficiency estimates); left out of to_dict."""

    @property
    def prompt_tokens_per_example(self) -> float:
        return (self.total_tokens - self.supervised_tokens) / max(self.examples, 1)

    @property
    def completion_tokens_per_example(self) -> float:
        return self.supervised_tokens / max(self.examples, 1)

    def over(self, max_length: int) -> int:
        return sum(1 for n in self.lengths if n > max_length)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("lengths")
        return out


def count_dataset(path: str | Path, tokenizer: Any = None, tokenizer_name: str | None = None) -> DatasetStats:
    """Count ``path`` (JSONL in any format ``tunesmith data prepare`` reads)."""
    from ..data import read_numbered

    path = input_file(path, "--data", hint="give a chat JSONL file (one {\"messages\": [...]} per line)")
    records = read_numbered(path, hint="fix these lines, or run `tunesmith data prepare --skip-bad-lines` to set "
                                       "them aside and count its prepared train.jsonl")
    lengths: list[int] = []
    supervised = 0
    for line_no, record in records:
        try:
            total, sup = _count(record["messages"], tokenizer)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where(path, line_no, 'messages')}: cannot be tokenized ({exc})",
                            hint="check it with `tunesmith data prepare`, which names the broken field") from None
        lengths.append(total)
        supervised += sup
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return DatasetStats(path=str(path), examples=len(lengths), tokenizer=tokenizer_name if tokenizer else None,
                        total_tokens=sum(lengths), supervised_tokens=supervised,
                        mean_tokens=round(sum(lengths) / len(lengths), 1), p50_tokens=pct(0.5), p90_tokens=pct(0.9),
                        p99_tokens=pct(0.99), max_tokens=ordered[-1], lengths=tuple(lengths))


def _count(messages: list[dict[str, Any]], tokenizer: Any) -> tuple[int, int]:
    if tokenizer is None:
        text = sum(len(str(m.get("content") or "")) for m in messages)
        answer = sum(len(str(m.get("content") or "")) for m in messages if m.get("role") == "assistant")
        return max(1, round(text / CHARS_PER_TOKEN)), round(answer / CHARS_PER_TOKEN)
    from ..chat import IGNORE_INDEX, tokenize_chat

    chat = tokenize_chat(tokenizer, messages)
    return len(chat.input_ids), sum(1 for label in chat.labels if label != IGNORE_INDEX)
