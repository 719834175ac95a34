"""``prepare``: raw JSONL files → a prepared folder that train and eval read.

read → hold out (eval FIRST, by position and seed) → validate → clean train → leakage → write → report.

Output folder: train.jsonl, eval.jsonl (canonical chat records), rejects.jsonl (every rejected or dropped example
with its source file, line, rule and reason: nothing is dropped silently), report.json / report.md / report.html,
lengths.png and manifest.json (inputs with sha256, resolved config, counts).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, where
from ..files import atomic_files
from ..paths import output_folder
from ..records import PreparedData, PreparedInput, versions
from . import clean, embedding
from .formats import Example, TableSource, is_preference, read_file
from .report import EXAMPLES_PER_RULE, length_stats, plot_lengths, role_counts, snippet, turn_counts, write_reports
from .split import holdout_indices
from .validate import check_preference, check_record, raise_problems, read_examples

RULES = ("validate", "short_outputs", "json_outputs", "overlong", "exact_dedup", "minhash", "embedding", "leakage")
"""Report order: the order rules run in. Quality filters run before de-duplication, so the example that
survives a duplicate cluster is one that passed them."""


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` wrote: counts, where, and how long each stage took."""

    out_dir: str
    train_examples: int
    eval_examples: int
    rejected: int
    """Lines in rejects.jsonl (every example that was read but is in neither split)."""
    removed_by_rule: dict[str, int]
    """Examples each rule removed, in the order the rules ran (with ``leakage.action: report``, the leakage
    count is of examples flagged and kept)."""
    truncated: int
    """Over-long examples kept by removing whole turns (``overlong.action: truncate``)."""
    files: dict[str, str]
    timings_s: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds per stage."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds of this process per stage (comparable across runs on a busy machine, unlike wall time)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        rules = ", ".join(f"{k} {v}" for k, v in self.removed_by_rule.items() if v) or "nothing removed"
        return (f"{self.train_examples} train, {self.eval_examples} eval, {self.rejected} rejected ({rules}) "
                f"→ {self.out_dir}")


@dataclass
class _Log:
    """Rejected examples and per-rule bookkeeping while the stage runs."""

    rejects: list[dict[str, Any]] = field(default_factory=list)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    snippets: dict[str, str] = field(default_factory=dict)

    def rule(self, name: str, enabled: bool = True, note: str = "") -> dict[str, Any]:
        self.rules[name] = {"enabled": enabled, "count": 0, "examples": [], **({"note": note} if note else {})}
        return self.rules[name]

    def drop(self, rule: str, ex: Example, split: str, reason: str, duplicate_of: Example | None = None) -> None:
        entry = self.rules[rule]
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_RULE:
            entry["examples"].append({"id": ex.id, "reason": reason})
            self.snippets[ex.id] = snippet(ex.record)
        self.rejects.append({"source": ex.source, "line": ex.line, "split": split, "rule": rule, "reason": reason,
                             **({"duplicate_of": duplicate_of.id} if duplicate_of else {}), "record": ex.record})


def prepare(config: Any = None, files: Sequence[str | Path] = (), out_dir: str | Path | None = None,
            eval_file: str | Path | None = None) -> PrepareResult:
    """Prepare a dataset folder. ``config``: a ``Config``, a dict of config values, a YAML path, or None for the
    defaults; ``files`` replace ``data.train_files``; ``eval_file`` replaces ``data.eval_file``."""
    cfg = _resolve_config(config)
    data = cfg.data
    train_files = [str(f) for f in files] or list(data.train_files)
    if not train_files:
        raise UserError("no input files", hint="pass JSONL files (tunesmith data prepare a.jsonl) or set "
                                               "data.train_files")
    eval_path = str(eval_file) if eval_file else data.eval_file
    out = output_folder(out_dir or data.out_dir or Path(cfg.out_dir) / "data",
                        "--out" if out_dir else "data.out_dir" if data.out_dir else "out_dir")
    max_length = data.overlong.max_length or cfg.train.max_length
    log, watch = _Log(), _Stopwatch()

    # 1. read: every non-blank line, parsed and converted to the canonical record (problems kept per line)
    tables = TableSource(dict(data.columns), tuple(data.ignore_columns), data.split, data.revision)
    pool = [ex for f in train_files for ex in read_file(f, data.max_line_bytes, data.max_depth, table=tables)]
    given_eval = read_file(eval_path, data.max_line_bytes, data.max_depth,
                           table=replace(tables, split=data.eval_split)) if eval_path else None
    watch.lap("read")

    # 2. hold out the eval split FIRST: by position and seed only, so no cleaning decision can shape it
    if given_eval is not None:
        train, evals = pool, given_eval
        holdout = f"the separate eval file {eval_path} ({len(given_eval):,} lines); nothing held out of train"
    else:
        held = holdout_indices(len(pool), data.eval_fraction, data.seed)
        train = [ex for i, ex in enumerate(pool) if i not in held]
        evals = [ex for i, ex in enumerate(pool) if i in held]
        holdout = (f"{len(held):,} of {len(pool):,} lines ({data.eval_fraction:.0%}, seed {data.seed}) chosen "
                   "before validation and cleaning")

    # preference pairs (train.objective: dpo, or a file of them): their own validation and rules, same hold-out
    preference = cfg.train.objective == "dpo" or _first_is_preference(pool)
    if preference:
        train, evals = _validate(train, evals, data.on_bad_lines, data.max_errors, log, check_preference)
        watch.lap("validate")
        train, tokenizer, views = _preference_rules(train, evals, data, cfg, max_length, log, watch)
    else:
        train, evals, tokenizer, views = _chat_rules(train, evals, data, cfg, max_length, log, watch)

    # 6. write the splits and the rejects; 7. the report, the histogram and the manifest — into a staging folder
    # first, so a failed write (a full disk) leaves the folder as it was: no half-written train.jsonl, no mix of runs
    inputs = [{"path": f, "split": "train" if given_eval is not None else "train+eval",
               "sha256": _sha256(f, [ex for ex in pool if ex.source == f]),
               "examples": sum(1 for ex in pool if ex.source == f)} for f in train_files]
    if eval_path:
        inputs.append({"path": eval_path, "split": "eval", "sha256": _sha256(eval_path, given_eval or []),
                       "examples": len(given_eval or [])})
    with atomic_files(out, last=PreparedData.FILE) as staging:
        files = {"train": _write_jsonl(staging / "train.jsonl", (ex.record for ex in train)),
                 "eval": _write_jsonl(staging / "eval.jsonl", (ex.record for ex in evals)),
                 "rejects": _write_jsonl(staging / "rejects.jsonl", log.rejects)}
        report = _build_report([*pool, *(given_eval or [])], views(train), views(evals), log, tokenizer, inputs,
                               holdout, cfg, max_length, staging)
        files["lengths_png"] = str(staging / "lengths.png")
        files.update(write_reports(report, log.snippets, staging))
        files["manifest"] = _write_manifest(staging, cfg, train_files, eval_path, inputs, report["counts"], files)
    files = {role: str(out / Path(path).name) for role, path in files.items()}
    watch.lap("write_and_report")
    if len(train) < data.min_examples:
        raise UserError(f"only {len(train)} training example(s) left after cleaning, fewer than data.min_examples "
                        f"({data.min_examples}); see {files['report_md']}",
                        hint="add data, relax the rules that removed most, or lower data.min_examples")
    return PrepareResult(str(out), len(train), len(evals), len(log.rejects),
                         {k: v["count"] for k, v in report["rules"].items()},
                         log.rules["overlong"].get("truncated", 0), files, watch.wall_s, watch.cpu_s)


def _chat_rules(train: list[Example], evals: list[Example], data: Any, cfg: Any, max_length: int, log: _Log,
                watch: _Stopwatch) -> tuple[list[Example], list[Example], Any, Any]:
    """Chat examples: validate, render, the quality filters, de-duplication and leakage (steps 3 to 5).
    Returns the splits, the tokenizer and how the report sees examples (as they are)."""
    # 3. validate: structural problems stop the run (all listed) unless bad lines are to be skipped
    train, evals = _validate(train, evals, data.on_bad_lines, data.max_errors, log)
    watch.lap("validate")

    # 4. clean the train split, one rule at a time: quality filters first, then duplicates
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    watch.lap("load_tokenizer")
    # every example must render with the chat template (tool calls included) before any is cleaned or written;
    # the token counts are kept for the rules and the report, so this costs no second rendering
    _lengths(sorted([*train, *evals], key=lambda ex: (ex.source, ex.line)), tokenizer)
    watch.lap("render")
    train = _quality_filters(train, data, tokenizer, max_length, log, watch)
    train, features = _deduplicate(train, data, log, watch)

    # 5. leakage: train examples that duplicate eval examples (exact, then the near-duplicate rules that ran)
    train = _remove_leakage(train, features, evals, data, log)
    watch.lap("leakage")
    return train, evals, tokenizer, lambda exs: exs


def _first_is_preference(pool: list[Example]) -> bool:
    """Whether the input's first readable line is a preference pair: the file's kind (a line of the other kind is
    then a problem with its line number)."""
    first = next((ex.record for ex in pool if ex.record is not None), None)
    return first is not None and is_preference(first)


def _preference_view(record: dict[str, Any], key: str) -> dict[str, Any]:
    """The chat a preference pair's answer ``key`` is trained as: the prompt, then that answer."""
    prompt = record["input"]
    return {"messages": [*prompt["messages"], *record[key]],
            **({"tools": prompt["tools"]} if prompt.get("tools") else {})}


def _preference_rules(train: list[Example], evals: list[Example], data: Any, cfg: Any, max_length: int, log: _Log,
                      watch: _Stopwatch) -> tuple[list[Example], Any, Any]:
    """Preference pairs: render both sequences of every pair, drop pairs over max_length (a pair is never
    truncated: cutting one answer would change the preference), remove exact duplicates (prompt + both answers)
    and train pairs that repeat an eval pair. The text-quality and near-duplicate rules are for chat examples and
    are reported as not applied. Returns the train split, the tokenizer and the report's view of a pair (the
    prompt with its preferred answer, its length the longer of the two sequences)."""
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    watch.lap("load_tokenizer")
    both = sorted([*train, *evals], key=lambda ex: (ex.source, ex.line))
    for ex, chosen, rejected in zip(both, *(clean.token_lengths([_preference_view(e.record, key) for e in both],
                                                                 tokenizer, [e.id for e in both])
                                            for key in ("preferred_output", "non_preferred_output")), strict=True):
        ex.tokens = max(chosen, rejected)
    watch.lap("render")
    for rule in ("short_outputs", "json_outputs"):
        log.rule(rule, False, note="not applied to preference pairs")
    ol = data.overlong
    log.rule("overlong", ol.enabled, note=f"max_length {max_length}; pairs are dropped, never truncated"
             if ol.enabled else "")
    if ol.enabled:
        for ex in train:
            if (ex.tokens or 0) > max_length:
                log.drop("overlong", ex, "train", f"{ex.tokens} tokens, over max_length {max_length}")
        train = [ex for ex in train if (ex.tokens or 0) <= max_length]

    def keys(exs: list[Example]) -> list[str]:
        return [clean.exact_key(clean.normalize(
            clean.conversation_text(_preference_view(ex.record, "preferred_output")) + "\n\nrejected: "
            + ex.record["non_preferred_output"][0]["content"])) for ex in exs]

    log.rule("exact_dedup", data.exact_dedup.enabled)
    if data.exact_dedup.enabled:
        keep = _drop_matches(train, clean.exact_duplicates(keys(train)), train, "exact_dedup",
                             "exact duplicate of {of}", log)
        train = _select(train, keep)
    for rule in ("minhash", "embedding"):
        log.rule(rule, False, note="not applied to preference pairs")
    lk = data.leakage
    log.rule("leakage", lk.enabled and bool(evals), note=f"action: {lk.action}" if lk.enabled else "")
    if lk.enabled and evals and train:
        keep = _drop_matches(train, clean.exact_matches(keys(train), keys(evals)), evals, "leakage",
                             "duplicates eval example {of} ({how})", log, remove=lk.action == "remove")
        train = _select(train, keep)
    watch.lap("exact_dedup")

    def views(exs: list[Example]) -> list[Example]:
        return [Example(ex.source, ex.line, _preference_view(ex.record, "preferred_output"), ex.format,
                        tokens=ex.tokens) for ex in exs]

    return train, tokenizer, views


def _validate(train: list[Example], evals: list[Example], on_bad_lines: str, max_errors: int,
              log: _Log, check: Any = check_record) -> tuple[list[Example], list[Example]]:
    """Check every readable record with ``check`` (chat examples, or preference pairs); stop with all problems
    listed, or reject the bad lines (``skip``)."""
    for ex in (*train, *evals):
        if ex.record is not None:
            ex.problems += check(ex.record, ex.source, ex.line, unit=ex.unit)
    if on_bad_lines == "error":
        raise_problems(sorted((p for ex in (*train, *evals) for p in ex.problems),
                              key=lambda p: (p.source, p.line or 0)), max_errors)
    log.rule("validate")
    for split, exs in (("train", train), ("eval", evals)):
        for ex in exs:
            if ex.problems:
                log.drop("validate", ex, split, "; ".join(f"{p.field}: {p.reason}" if p.field else p.reason
                                                          for p in ex.problems))
    return [ex for ex in train if not ex.problems], [ex for ex in evals if not ex.problems]


@dataclass
class _Features:
    """What the duplicate rules keep per train example (aligned as examples are dropped). The near-duplicate text
    is not kept: it is rebuilt from the record while a rule reads it (``_near_texts``), so no second copy of the
    data lives in memory."""

    keys: list[str]
    """Exact keys: the whole normalised conversation, system messages included."""
    sigs: list[Any] | None = None
    emb: Any = None
    """float16 unit rows of the embedding rule (numpy)."""
    groups: Any = None
    """The literal key of each example's near-duplicate text (numpy int64; see ``clean.literal_key``)."""

    @classmethod
    def of(cls, exs: Sequence[Example]) -> _Features:
        return cls([clean.exact_key(clean.normalize(clean.conversation_text(ex.record))) for ex in exs],
                   groups=np.fromiter((clean.literal_key(t) for t in _norms(exs)), dtype=np.int64, count=len(exs)))

    def select(self, keep: list[bool]) -> _Features:
        return _Features(_select(self.keys, keep), *(None if v is None else _select(v, keep)
                                                      for v in (self.sigs, self.emb, self.groups)))


def _near_texts(exs: Sequence[Example]) -> Iterator[str]:
    """The text near-duplicate rules compare: the conversation without system messages, one example at a time."""
    return (clean.conversation_text(ex.record, system=False) for ex in exs)


def _norms(exs: Sequence[Example]) -> Iterator[str]:
    return (clean.normalize(t) for t in _near_texts(exs))


def _embed(exs: Sequence[Example], em: Any) -> Any:
    return embedding.encode(_near_texts(exs), len(exs), encoder=em.encoder,
                            model_path=embedding.model_folder(em.model), batch_size=em.batch_size)


def _deduplicate(train: list[Example], data: Any, log: _Log,
                 watch: _Stopwatch) -> tuple[list[Example], _Features]:
    """Exact, MinHash and embedding near-duplicates within train; the first of each cluster stays."""
    feats = _Features.of(train)
    log.rule("exact_dedup", data.exact_dedup.enabled)
    if data.exact_dedup.enabled:
        keep = _drop_matches(train, clean.exact_duplicates(feats.keys), train, "exact_dedup",
                             "exact duplicate of {of}", log)
        train, feats = _select(train, keep), feats.select(keep)
    watch.lap("exact_dedup")
    mh = data.minhash
    log.rule("minhash", mh.enabled)
    if mh.enabled:
        feats.sigs = clean.minhash_signatures(_norms(train), mh.num_perm, mh.shingle_size)
        found = clean.minhash_duplicates(feats.sigs, mh.threshold, mh.num_perm,
                                         feats.groups if mh.match_literals else None)
        keep = _drop_matches(train, found, train, "minhash", "near-duplicate of {of} ({how})", log)
        train, feats = _select(train, keep), feats.select(keep)
    watch.lap("minhash")
    em = data.embedding
    too_many = em.max_examples is not None and len(train) > em.max_examples
    cosine = embedding.threshold(em.encoder, em.threshold)
    literals = ", same numbers and quoted strings" if em.match_literals else ""
    log.rule("embedding", em.enabled, note=(f"skipped: {len(train):,} examples > embedding.max_examples "
                                            f"{em.max_examples:,}" if too_many else
                                            f"{em.encoder} encoder, cosine ≥ {cosine}{literals}, search {em.search}")
             if em.enabled else "")
    if em.enabled and not too_many and train:
        feats.emb = _embed(train, em)
        watch.lap("embedding_encode")
        found = embedding.duplicates(feats.emb, cosine, em.search, feats.groups if em.match_literals else None)
        keep = _drop_matches(train, found, train, "embedding", "near-duplicate of {of} ({how})", log)
        train, feats = _select(train, keep), feats.select(keep)
    watch.lap("embedding")
    return train, feats


def _remove_leakage(train: list[Example], feats: _Features, evals: list[Example], data: Any,
                    log: _Log) -> list[Example]:
    """Train examples that copy an eval example: removed (or only reported, ``leakage.action: report``)."""
    lk = data.leakage
    log.rule("leakage", lk.enabled and bool(evals), note=f"action: {lk.action}" if lk.enabled else "")
    if not (lk.enabled and evals and train):
        return train
    ev = _Features.of(evals)
    leaks: dict[int, clean.Match] = {}
    if feats.emb is not None:
        em = data.embedding
        guard = em.match_literals
        leaks.update(embedding.matches(feats.emb, _embed(evals, em), embedding.threshold(em.encoder, em.threshold),
                                       em.search, feats.groups if guard else None, ev.groups if guard else None))
    if feats.sigs is not None:
        mh = data.minhash
        ev.sigs = clean.minhash_signatures(_norms(evals), mh.num_perm, mh.shingle_size)
        guard = mh.match_literals
        leaks.update(clean.minhash_matches(feats.sigs, ev.sigs, mh.threshold, mh.num_perm,
                                           feats.groups if guard else None, ev.groups if guard else None))
    leaks.update(clean.exact_matches(feats.keys, ev.keys))  # the strongest evidence names the match
    keep = _drop_matches(train, leaks, evals, "leakage", "duplicates eval example {of} ({how})", log,
                         remove=lk.action == "remove")
    return _select(train, keep)


def _build_report(read: Sequence[Example], train: list[Example], evals: list[Example], log: _Log, tokenizer: Any,
                  inputs: list[dict[str, Any]], holdout: str, cfg: Any, max_length: int, out: Path) -> dict[str, Any]:
    """The report's content (and lengths.png): counts per rule, lengths, roles, turns, special-token text."""
    data = cfg.data
    train_lengths, eval_lengths = _lengths(train, tokenizer), _lengths(evals, tokenizer)
    plot_lengths(train_lengths, eval_lengths, max_length if data.overlong.enabled else None, out / "lengths.png")
    both = [*train, *evals]
    specials = clean.special_token_hits([ex.record for ex in both], tokenizer)
    train_records, eval_records = [ex.record for ex in train], [ex.record for ex in evals]
    return {
        "model": cfg.model.name_or_path, "inputs": inputs,
        "counts": {"read": len(read), "train": len(train), "eval": len(evals),
                   "rejected": len(log.rejects)},
        "holdout": {"description": holdout, "seed": data.seed, "eval_fraction": data.eval_fraction},
        "formats": dict(Counter(ex.format or "unreadable" for ex in read)),
        "rules": {name: log.rules[name] for name in RULES if name in log.rules},
        "lengths": {"max_length": max_length, "splits": {"train": length_stats(train_lengths),
                                                         "eval": length_stats(eval_lengths)}},
        "roles": {"train": role_counts(train_records), "eval": role_counts(eval_records)},
        "turns": {"train": turn_counts(train_records), "eval": turn_counts(eval_records)},
        "special_tokens": {"examples": len(specials), "tokens": sorted({t for ts in specials.values() for t in ts}),
                           "example_ids": [both[i].id for i in list(specials)[:EXAMPLES_PER_RULE]]},
    }


def _quality_filters(train: list[Example], data: Any, tokenizer: Any, max_length: int, log: _Log,
                     watch: _Stopwatch) -> list[Example]:
    """Short outputs, JSON outputs and over-long examples (drop or truncate by whole turns)."""
    so = data.short_outputs
    log.rule("short_outputs", so.enabled, note=f"min {so.min_tokens} tokens" if so.enabled else "")
    if so.enabled:
        train = _drop_reasons(train, clean.short_outputs([ex.record for ex in train], tokenizer, so.min_tokens),
                              "short_outputs", log)
    watch.lap("short_outputs")
    jo = data.json_outputs
    log.rule("json_outputs", jo.enabled, note=f"schema {jo.json_schema}" if jo.json_schema else "")
    if jo.enabled:
        validator = clean.load_json_schema(jo.json_schema) if jo.json_schema else None
        train = _drop_reasons(train, clean.json_output_problems([ex.record for ex in train], validator),
                              "json_outputs", log)
    watch.lap("json_outputs")
    ol = data.overlong
    entry = log.rule("overlong", ol.enabled, note=f"max_length {max_length}, action: {ol.action}" if ol.enabled
                     else "")
    if ol.enabled:
        entry["truncated"], entry["truncated_examples"] = 0, []
        kept = []
        for ex, n in zip(train, _lengths(train, tokenizer), strict=True):
            if n <= max_length:
                kept.append(ex)
                continue
            shorter = clean.truncate_to_fit(ex.record, tokenizer, max_length) if ol.action == "truncate" else None
            if shorter is not None:
                if len(entry["truncated_examples"]) < EXAMPLES_PER_RULE:
                    entry["truncated_examples"].append(
                        {"id": ex.id, "reason": f"{n} tokens, over max_length {max_length}: kept the first "
                                                f"{len(shorter['messages'])} of {len(ex.record['messages'])} messages"})
                ex.record, ex.tokens = shorter, None
                entry["truncated"] += 1
                kept.append(ex)
            else:
                why = "; its first answer alone does not fit" if ol.action == "truncate" else ""
                log.drop("overlong", ex, "train", f"{n} tokens, over max_length {max_length}{why}")
        if entry["truncated"]:
            entry["note"] += f"; {entry['truncated']} truncated by whole turns"
        train = kept
    watch.lap("overlong")
    return train


def _lengths(exs: list[Example], tokenizer: Any) -> list[int]:
    """Token lengths of ``exs``, counting only those not yet counted."""
    todo = [ex for ex in exs if ex.tokens is None]
    for ex, n in zip(todo, clean.token_lengths([ex.record for ex in todo], tokenizer, [ex.id for ex in todo]),
                     strict=True):
        ex.tokens = n
    return [ex.tokens or 0 for ex in exs]


def _drop_reasons(exs: list[Example], reasons: dict[int, str], rule: str, log: _Log) -> list[Example]:
    for i, reason in reasons.items():
        log.drop(rule, exs[i], "train", reason)
    return [ex for i, ex in enumerate(exs) if i not in reasons]


def _drop_matches(exs: list[Example], matches: dict[int, clean.Match], reference: list[Example], rule: str,
                  template: str, log: _Log, remove: bool = True) -> list[bool]:
    """Log each match (with the example it duplicates) and return the keep mask (all True when only reporting)."""
    keep = [True] * len(exs)
    for i in sorted(matches):
        m = matches[i]
        reason = template.format(of=reference[m.of].id, how=m.describe())
        if remove:
            log.drop(rule, exs[i], "train", reason, duplicate_of=reference[m.of])
            keep[i] = False
        else:
            entry = log.rules[rule]
            entry["count"] += 1
            if len(entry["examples"]) < EXAMPLES_PER_RULE:
                entry["examples"].append({"id": exs[i].id, "reason": reason + " (kept: leakage.action report)"})
    return keep


def _select(items: Any, keep: list[bool]) -> Any:
    if isinstance(items, np.ndarray):  # the embedding rows
        return items[np.asarray(keep, dtype=bool)]
    return [x for x, k in zip(items, keep, strict=True) if k]


@dataclass
class _Stopwatch:
    """Wall and CPU seconds per stage: ``lap(name)`` records the time since the previous lap."""

    wall_s: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    _wall: float = field(default_factory=time.perf_counter)
    _cpu: float = field(default_factory=time.process_time)

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall_s[name] = round(wall - self._wall, 3)
        self.cpu_s[name] = round(cpu - self._cpu, 3)
        self._wall, self._cpu = wall, cpu


def _resolve_config(config: Any) -> Any:
    from ..config import Config, load_config

    if config is None:
        return load_config(None)
    if isinstance(config, Config):
        return config
    if isinstance(config, str | Path):
        return load_config(config)
    if isinstance(config, dict):
        from pydantic import ValidationError

        from ..config import _format_validation

        try:
            return Config.model_validate(config)
        except ValidationError as exc:
            raise UserError(_format_validation(exc, "<config values>", {})) from None
    raise TypeError(f"config must be a Config, a dict, a path or None, not {type(config).__name__}")


def _write_jsonl(path: Path, rows: Any) -> str:
    """One JSON object per line (into the staging folder ``prepare`` renames from)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def _sha256(path: str, examples: list[Example]) -> str:
    """The file's sha256; for a ``save_to_disk`` folder or a hub dataset, of the records read from it (in order)."""
    if not Path(path).is_file():
        digest = hashlib.sha256()
        for ex in examples:
            digest.update(json.dumps(ex.record, sort_keys=True).encode() + b"\n")
        return digest.hexdigest()
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_manifest(out: Path, cfg: Any, train_files: list[str], eval_path: str | None, inputs: list[dict[str, Any]],
                    counts: dict[str, int], files: dict[str, str]) -> str:
    record = PreparedData(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          inputs=[PreparedInput(**i) for i in inputs],
                          config={"data": {**cfg.data.model_dump(mode="json"), "train_files": train_files,
                                           "eval_file": eval_path},
                                  "model": cfg.model.model_dump(mode="json"),
                                  "train": {"max_length": cfg.train.max_length}},
                          counts=counts, outputs={k: Path(v).name for k, v in files.items()}, versions=versions())
    return str(record.write(out))


def prepared_files(path: str | Path) -> tuple[Path, Path | None]:
    """(train file, eval file or None) of a prepared folder (train.jsonl [+ a non-empty eval.jsonl]) or of one
    JSONL file (train only)."""
    path = Path(path)
    if path.is_dir():
        train = path / "train.jsonl"
        if not train.is_file():
            raise UserError(f"{where(path)}: no train.jsonl in this folder",
                            hint="run `tunesmith data prepare` first, or give a JSONL file")
        ev = path / "eval.jsonl"
        return train, (ev if ev.is_file() and ev.stat().st_size else None)
    if not path.is_file():
        raise UserError(f"{where(path)}: does not exist", hint="give a prepared folder or a JSONL file")
    return path, None


def load_prepared(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(train records, eval records or None) of a prepared folder or one JSONL file. What the train and eval
    stages read."""
    train, ev = prepared_files(path)
    return read_examples(train), (read_examples(ev) if ev else None)
