"""The cleaning rules of the guide's checklist. Each takes plain values (records, texts, a tokenizer, thresholds)
and returns which positions to drop and why; ``prepare`` decides order and writes the reasons down.

Near-duplicate rules are greedy in input order: an example is dropped when it is similar to an EARLIER example that
was kept, so of a cluster of near-copies exactly the first survives (and a chain a≈b≈c with a≉c keeps c). The
embedding rule lives in ``embedding``.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..chat import segments, tokenize_chat


@dataclass(frozen=True)
class Match:
    """Why an example goes: it duplicates example ``of`` (a position in the reference list) with ``score``."""

    of: int
    score: float = 1.0
    method: str = "exact"
    """``exact``, ``minhash`` (score: estimated Jaccard) or ``embedding`` (score: cosine)."""

    def describe(self) -> str:
        return {"exact": "exact", "minhash": f"MinHash Jaccard ≈ {self.score:.2f}",
                "embedding": f"cosine {self.score:.3f}"}[self.method]


def conversation_text(record: dict[str, Any], system: bool = True) -> str:
    """The text a duplicate check compares: each message's role and content, tool calls included.

    Near-duplicate checks leave system messages out (``system=False``): datasets often repeat one long system
    prompt in every example, which would make every pair look alike (a 300-word prompt shared by two 50-word
    exchanges alone gives a Jaccard similarity of ~0.75)."""
    parts = []
    for msg in record["messages"]:
        if not system and msg["role"] == "system":
            continue
        parts.append(f"{msg['role']}: {msg.get('content') or ''}")
        if msg.get("tool_calls"):
            parts.append(json.dumps(msg["tool_calls"], sort_keys=True, ensure_ascii=False))
    return "\n".join(parts)


_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed: "Hello  World" and "hello world" are the same example."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


LITERAL = re.compile(r"\d+(?:\.\d+)?|(?<!\w)'[^'\n]{0,200}'(?!\w)|\"[^\"\n]{0,200}\"")
"""Numbers and quoted strings (an apostrophe inside a word, "don't", opens none)."""


def literal_key(normalized: str) -> int:
    """One 63-bit value per multiset of literals (numbers, quoted strings) in an already ``normalize``d text:
    equal keys = the same literals. Near-duplicate rules compare only examples with equal keys: a query for id
    61593 is not a copy of the one for 61596, however alike their words (``match_literals``)."""
    found = "\0".join(sorted(LITERAL.findall(normalized)))
    return int.from_bytes(hashlib.blake2b(found.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def exact_key(normalized: str) -> str:
    """A digest of an already ``normalize``d text: equal keys = the same example."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()


def exact_duplicates(keys: Sequence[str]) -> dict[int, Match]:
    """Positions whose key appeared earlier, with the first position that had it."""
    first: dict[str, int] = {}
    out: dict[int, Match] = {}
    for i, key in enumerate(keys):
        if key in first:
            out[i] = Match(first[key])
        else:
            first[key] = i
    return out


def exact_matches(keys: Sequence[str], reference: Sequence[str]) -> dict[int, Match]:
    """Positions whose key is also in ``reference`` (leakage: train examples that are eval examples)."""
    index: dict[str, int] = {}
    for j, key in enumerate(reference):
        index.setdefault(key, j)
    return {i: Match(index[k]) for i, k in enumerate(keys) if k in index}


def minhash_signatures(normalized: Iterable[str], num_perm: int, shingle_size: int) -> list[Any]:
    """One MinHash per ``normalize``d text over its word ``shingle_size``-grams (datasketch, one shared
    permutation set).

    Shingles are hashed with CRC-32 instead of datasketch's default (SHA-1 cut to 32 bits): MinHash needs only
    a deterministic 32-bit value per distinct shingle (its random permutations do the mixing), and CRC-32 is a
    single C call — this halves the signature time, the largest cost of the stage at 100k examples."""
    from datasketch import MinHash

    def shingles(text: str) -> list[bytes]:
        words = text.split(" ")
        if len(words) <= shingle_size:
            return [text.encode("utf-8")]
        return [" ".join(words[i:i + shingle_size]).encode("utf-8") for i in range(len(words) - shingle_size + 1)]

    # a generator: one example's shingles exist at a time (all of them at once cost ~0.6 GB per 100k examples)
    return list(MinHash.generator((shingles(t) for t in normalized), num_perm=num_perm, hashfunc=zlib.crc32))


def minhash_duplicates(signatures: Sequence[Any], threshold: float, num_perm: int,
                       groups: Sequence[int] | None = None) -> dict[int, Match]:
    """Positions whose estimated Jaccard similarity to an earlier KEPT position is ≥ threshold (LSH candidates,
    verified on the signatures); with ``groups`` (``literal_key``s), only a position of the same group counts."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    out: dict[int, Match] = {}
    for i, sig in enumerate(signatures):
        candidates = lsh.query(sig)
        if groups is not None:
            candidates = [j for j in candidates if groups[j] == groups[i]]
        best = _best_candidate(sig, candidates, signatures, threshold)
        if best is not None:
            out[i] = best
        else:
            lsh.insert(i, sig)
    return out


def minhash_matches(signatures: Sequence[Any], reference: Sequence[Any], threshold: float, num_perm: int,
                    groups: Sequence[int] | None = None,
                    reference_groups: Sequence[int] | None = None) -> dict[int, Match]:
    """Positions whose estimated Jaccard similarity to any ``reference`` signature (of the same group, when
    groups are given) is ≥ threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    with lsh.insertion_session() as session:
        for j, sig in enumerate(reference):
            session.insert(j, sig)
    out = {}
    for i, sig in enumerate(signatures):
        candidates = lsh.query(sig)
        if groups is not None and reference_groups is not None:
            candidates = [j for j in candidates if reference_groups[j] == groups[i]]
        best = _best_candidate(sig, candidates, reference, threshold)
        if best is not None:
            out[i] = best
    return out


def _best_candidate(sig: Any, candidates: list[int], pool: Sequence[Any], threshold: float) -> Match | None:
    best: Match | None = None
    for j in candidates:
        score = sig.jaccard(pool[j])
        if score >= threshold and (best is None or score > best.score):
            best = Match(j, float(score), "minhash")
    return best


def trained_outputs(record: dict[str, Any]) -> list[tuple[int, str]]:
    """(message index, output text) of each assistant turn that is trained on (weight not 0). A tool-call turn's
    output is its content plus its calls as JSON."""
    out = []
    for i, msg in enumerate(record["messages"]):
        if msg.get("role") == "assistant" and msg.get("weight", 1) != 0:
            text = msg.get("content") or ""
            if msg.get("tool_calls"):
                text += json.dumps(msg["tool_calls"], ensure_ascii=False)
            out.append((i, text))
    return out


def short_outputs(records: Sequence[dict[str, Any]], tokenizer: Any, min_tokens: int) -> dict[int, str]:
    """Positions with a trained assistant output under ``min_tokens`` tokens, with the reason. Content is
    tokenised as text (special-token strings split), exactly as training tokenises it."""
    where: list[tuple[int, int]] = []
    texts: list[str] = []
    for pos, record in enumerate(records):
        for msg_index, text in trained_outputs(record):
            where.append((pos, msg_index))
            texts.append(text)
    counts = _token_counts(tokenizer, texts, split_special=True)
    out: dict[int, str] = {}
    for (pos, msg_index), count in zip(where, counts, strict=True):
        if count < min_tokens and pos not in out:
            out[pos] = f"messages[{msg_index}]: assistant output is {count} tokens, under {min_tokens}"
    return out


def load_json_schema(path: str) -> Any:
    """A jsonschema validator for the schema file (the draft the schema declares; 2020-12 if none)."""
    from pathlib import Path

    from jsonschema import validators
    from jsonschema.exceptions import SchemaError

    from ..errors import UserError

    file = Path(path)
    if not file.is_file():
        raise UserError(f"data.json_outputs.json_schema: {path} does not exist")
    try:
        schema = json.loads(file.read_text(encoding="utf-8"))
        cls = validators.validator_for(schema)
        cls.check_schema(schema)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"data.json_outputs.json_schema: {path} is not valid JSON ({exc})") from None
    except SchemaError as exc:
        raise UserError(f"data.json_outputs.json_schema: {path} is not a valid JSON Schema: {exc.message}") from None
    return cls(schema)


def json_output_problems(records: Sequence[dict[str, Any]], validator: Any | None) -> dict[int, str]:
    """Positions with a trained assistant output (tool-call turns aside) that is not JSON, or not valid against
    the schema, with the reason."""
    from jsonschema.exceptions import best_match

    out: dict[int, str] = {}
    for pos, record in enumerate(records):
        for i, msg in enumerate(record["messages"]):
            if msg.get("role") != "assistant" or msg.get("weight", 1) == 0 or msg.get("tool_calls"):
                continue
            try:
                value = json.loads(msg.get("content") or "")
            except (json.JSONDecodeError, RecursionError, ValueError) as exc:
                col = f" (column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
                out[pos] = f"messages[{i}]: assistant output is not JSON{col}"
                break
            if validator is not None:
                error = best_match(validator.iter_errors(value))
                if error is not None:
                    out[pos] = (f"messages[{i}]: assistant output does not match the schema at {error.json_path}: "
                                f"{error.message[:120]}")
                    break
    return out


def token_lengths(records: Sequence[dict[str, Any]], tokenizer: Any,
                  names: Sequence[str] | None = None) -> list[int]:
    """Tokens per example exactly as training sees them (chat template, end-of-turn tokens, content as text).

    Same segmentation as ``chat.tokenize_chat`` (so the counts are equal), but the pieces of ``TOKENIZE_CHUNK``
    examples at a time are tokenised in two batched calls (content / template text) instead of one call each.
    ``names`` (``file:line`` of each record) lead the message when the chat template cannot render one."""
    from ..errors import UserError

    lengths: list[int] = []
    for start in range(0, len(records), TOKENIZE_CHUNK):
        chunk = records[start:start + TOKENIZE_CHUNK]
        owners: dict[bool, list[int]] = {True: [], False: []}
        texts: dict[bool, list[str]] = {True: [], False: []}
        for pos, record in enumerate(chunk):
            try:
                pieces = segments(tokenizer, record["messages"], record.get("tools"))
            except UserError as exc:
                if names is None:
                    raise
                raise UserError(f"{names[start + pos]}: {exc.message}", hint=exc.hint) from None
            for seg in pieces:
                owners[seg.content].append(pos)
                texts[seg.content].append(seg.text)
        counts = [0] * len(chunk)
        for content, batch in texts.items():
            for pos, n in zip(owners[content], _token_counts(tokenizer, batch, split_special=content), strict=True):
                counts[pos] += n
        lengths += counts
    return lengths


TOKENIZE_CHUNK = 2048
"""Texts tokenised per call: batching is what makes it fast, chunking keeps memory flat (token-id lists of
100,000 examples at once took gigabytes)."""


def _token_counts(tokenizer: Any, texts: Sequence[str], split_special: bool) -> list[int]:
    out: list[int] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start:start + TOKENIZE_CHUNK])
        out += [len(ids) for ids in tokenizer(chunk, add_special_tokens=False,
                                              split_special_tokens=split_special)["input_ids"]]
    return out


def truncate_to_fit(record: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any] | None:
    """The record with whole turns removed from the end until it fits in ``max_length`` tokens and ends with a
    trained assistant turn; None when even the first answer does not fit. Never cuts an answer mid-way."""
    messages = record["messages"]
    for keep in range(len(messages) - 1, 0, -1):
        last = messages[keep - 1]
        if last.get("role") != "assistant" or last.get("weight", 1) == 0:
            continue
        if len(tokenize_chat(tokenizer, messages[:keep], record.get("tools")).input_ids) <= max_length:
            return {**record, "messages": messages[:keep]}
    return None


def special_token_hits(records: Sequence[dict[str, Any]], tokenizer: Any) -> dict[int, list[str]]:
    """Positions whose message content contains the text of a tokenizer special token (``<|im_end|>``…). Allowed:
    training tokenises it as plain characters, never as the control token; reported so people can look."""
    specials = sorted({t for t in tokenizer.all_special_tokens if len(t) > 1} |
                      {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and len(t.content) > 1},
                      key=len, reverse=True)
    if not specials:
        return {}
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    out: dict[int, list[str]] = {}
    for pos, record in enumerate(records):
        found = {m.group(0) for msg in record["messages"] if isinstance(msg.get("content"), str)
                 for m in pattern.finditer(msg["content"])}
        if found:
            out[pos] = sorted(found)
    return out
