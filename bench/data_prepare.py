"""Benchmark: the whole default `tunesmith data prepare` on synthetic chat examples with planted duplicates.

Plants exact duplicates (half of them with changed case/spacing, which normalisation must still catch), near
duplicates (1-3 words replaced, inserted or deleted in the answer), each placed after its original, and hard
negatives: pairs of different answers that share a template (SQL queries differing in one column, number or city;
products of numbers differing in one operand), which no rule may drop. Then:

1. runs ``prepare()`` with every default rule (hold-out 5%, short outputs, over-long, exact, MinHash and the static
   embedding pass, leakage, report), timing every stage (wall and CPU seconds); recall of the planted pairs and
   precision of every duplicate drop from rejects.jsonl; hard negatives dropped;
2. the embedding pass on its own: the static encoder's cosine for every planted near pair and hard-negative pair,
   recall / hard negatives over the default threshold (literal guard on);
3. peak RSS (getrusage) before and after ``prepare`` (the generated rows are freed first).

Usage: PYTHONPATH=src python bench/data_prepare.py [--n 100000] [--hard 1000]
Writes bench/results/data_prepare.json and bench/results/data_prepare.md (``--tag X``: data_prepare_X.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ["You are a helpful assistant.", "You are a concise support agent.", "Answer as an expert analyst.",
           "You write clear technical explanations.", ""]


def vocabulary() -> list[str]:
    """~21,000 real English words (the embedding model's own word-piece vocabulary, whole words only)."""
    from tunesmith.data.embedding import default_model as default_embedding_model

    lines = (Path(default_embedding_model()) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [w for w in lines if w.isalpha() and w.islower() and 3 <= len(w) <= 12]


def sentence(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n)).capitalize() + "."


def make_example(rng: random.Random, vocab: list[str]) -> dict:
    system = rng.choice(SYSTEMS)
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": sentence(rng, vocab, rng.randint(10, 25))})
    answer = " ".join(sentence(rng, vocab, rng.randint(8, 16)) for _ in range(rng.randint(3, 7)))
    msgs.append({"role": "assistant", "content": answer})
    return {"messages": msgs}


def near_copy(rng: random.Random, vocab: list[str], record: dict) -> dict:
    """The same example with 1-3 single-word edits (replace / insert / delete) in the answer."""
    out = json.loads(json.dumps(record))
    words = out["messages"][-1]["content"].split(" ")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words))
        op = rng.choice(("replace", "insert", "delete"))
        if op == "replace":
            words[i] = rng.choice(vocab)
        elif op == "insert":
            words.insert(i, rng.choice(vocab))
        elif len(words) > 10:
            del words[i]
    out["messages"][-1]["content"] = " ".join(words)
    return out


def exact_copy(rng: random.Random, record: dict) -> dict:
    """The same example, half the time with changed case and doubled spaces (normalisation must catch it)."""
    out = json.loads(json.dumps(record))
    if rng.random() < 0.5:
        msg = out["messages"][-1]
        msg["content"] = msg["content"].upper().replace(" ", "  ")
    return out


COLUMNS = ["name", "email", "city", "country", "signup_date", "phone", "age", "status"]
TABLES = ["customers", "orders", "products", "suppliers", "employees"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Oslo", "Lisbon", "Vienna", "Prague", "Dublin", "Warsaw"]


def hard_negative_pair(rng: random.Random) -> tuple[dict, dict, str]:
    """Two different answers from one template (one column, number, city or operand differs), and the kind."""
    kind = rng.choice(("column", "number", "city", "operand"))
    table, col, city = rng.choice(TABLES), rng.choice(COLUMNS), rng.choice(CITIES)
    if kind == "column":
        a, b = rng.sample(COLUMNS, 2)
        qa = [(f"List the {c} of every row in {table} located in {city}.",
               f"SELECT {c} FROM {table} WHERE city = '{city}';") for c in (a, b)]
    elif kind == "number":
        x = rng.randint(100, 99_999)
        qa = [(f"How many {table} have an id greater than {v}?", f"SELECT COUNT(*) FROM {table} WHERE id > {v};")
              for v in (x, x + rng.randint(1, 50))]
    elif kind == "city":
        qa = [(f"Show the {col} of {table} in {c}, sorted by {col}.",
               f"SELECT {col} FROM {table} WHERE city = '{c}' ORDER BY {col};") for c in rng.sample(CITIES, 2)]
    else:
        x, y = rng.randint(10, 999), rng.randint(10, 999)
        qa = [(f"What is {x} times {v}?", f"{x} × {v} = {x * v}.") for v in (y, y + rng.randint(1, 9))]
    a, b = ({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]} for q, ans in qa)
    return a, b, kind


def build_dataset(n: int, exact: int, near: int, hard: int, seed: int, vocab: list[str]):
    """Rows (in file order), planted pairs as 0-based (copy position, original position, kind) and hard-negative
    pairs as (second, first, kind) positions."""
    rng = random.Random(seed)
    originals = [make_example(rng, vocab) for _ in range(n - exact - near - 2 * hard)]
    sources = rng.sample(range(len(originals)), exact + near)  # each original copied at most once
    copies = [(exact_copy(rng, originals[s]), s, "exact") for s in sources[:exact]]
    copies += [(near_copy(rng, vocab, originals[s]), s, "near") for s in sources[exact:]]
    # place each copy somewhere after its original; each hard-negative pair somewhere, its two rows apart
    slots: dict[int, list[tuple[dict, int, str]]] = {}
    for row, s, kind in copies:
        slots.setdefault(rng.randint(s, len(originals) - 1), []).append((row, s, kind))
    siblings: dict[int, list[tuple[dict, dict, str]]] = {}
    seen: set[str] = set()  # every hard-negative row is a different answer: none repeats another pair's row
    while len(seen) < 2 * hard:
        a, b, kind = hard_negative_pair(rng)
        texts = {json.dumps(a), json.dumps(b)}
        if len(texts) == 2 and not texts & seen:
            seen |= texts
            siblings.setdefault(rng.randrange(len(originals)), []).append((a, b, kind))
    rows, pos_of_original, pairs, hard_pairs = [], {}, [], []
    for i, row in enumerate(originals):
        pos_of_original[i] = len(rows)
        rows.append(row)
        for copy, s, kind in slots.get(i, []):
            pairs.append((len(rows), pos_of_original[s], kind))
            rows.append(copy)
        for first, second, kind in siblings.get(i, []):
            rows += [first, second]
            hard_pairs.append((len(rows) - 1, len(rows) - 2, kind))
    return rows, pairs, hard_pairs


def pair_outcomes(pairs, rejects, src: str):
    """Per kind: planted pairs detected (one of the two dropped as a duplicate of the other) and not checkable
    (both held out for eval: eval is never de-duplicated)."""
    dropped = {}
    for r in rejects:
        if r.get("duplicate_of"):
            dropped[(r["line"], r["duplicate_of"])] = r["rule"]
    out = {}
    for copy, orig, kind in pairs:
        a, b = copy + 1, orig + 1  # 1-based lines
        rule = dropped.get((a, f"{src}:{b}")) or dropped.get((b, f"{src}:{a}"))
        out[(copy, orig)] = (kind, rule)
    return out


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


DEDUP_RULES = ("exact_dedup", "minhash", "embedding", "leakage")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--exact", type=int, default=None, help="planted exact copies (default n / 20)")
    ap.add_argument("--near", type=int, default=None, help="planted near copies (default n / 20)")
    ap.add_argument("--hard", type=int, default=1_000, help="hard-negative pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="results file suffix (data_prepare_TAG.json)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    exact = args.n // 20 if args.exact is None else args.exact
    near = args.n // 20 if args.near is None else args.near

    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np

    from tunesmith.data import clean, embedding, prepare

    load_before = os.getloadavg()
    cpu_start = time.process_time()
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    try:
        vocab = vocabulary()
        t0 = time.perf_counter()
        rows, pairs, hard_pairs = build_dataset(args.n, exact, near, args.hard, args.seed, vocab)
        src = work / "raw.jsonl"
        with open(src, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        gen_s = time.perf_counter() - t0
        print(f"generated {len(rows):,} examples ({src.stat().st_size / 2**20:.1f} MiB) in {gen_s:.1f} s", flush=True)
        near_texts = [(clean.conversation_text(rows[c], system=False), clean.conversation_text(rows[o], system=False))
                      for c, o, k in pairs if k == "near"]
        hard_texts = [(clean.conversation_text(rows[a], system=False), clean.conversation_text(rows[b], system=False),
                       k) for a, b, k in hard_pairs]
        n_rows, size = len(rows), src.stat().st_size
        del rows  # prepare reads the file; the generator's rows would only inflate the peak

        # 1. the whole stage, every default rule
        cfg = {"model": {"name_or_path": "local:tiny"}, "data": {"eval_fraction": 0.05, "seed": 1}}
        from tunesmith.config import ModelConfig
        from tunesmith.models import load_tokenizer  # build the tiny model once, outside the timed run

        load_tokenizer(ModelConfig(name_or_path="local:tiny"))
        embedding.static_model(embedding.default_model())  # distilled once per machine (cached), outside the timing
        rss_before_prepare = rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        result = prepare(cfg, [src], work / "prepared")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss_after_prepare = rss_mb()
        print(f"prepare: {wall:.1f} s  {result.summary()}", flush=True)
        print("stages:", result.timings_s, flush=True)
        rejects = [json.loads(line) for line in
                   (work / "prepared" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
        outcomes = pair_outcomes(pairs, rejects, str(src))
        from tunesmith.data.split import holdout_indices

        held = holdout_indices(n_rows, 0.05, 1)
        stats = {}
        for kind in ("exact", "near"):
            checkable = [(k, v) for k, v in outcomes.items() if v[0] == kind and not (k[0] in held and k[1] in held)]
            found = [v for _, v in checkable if v[1]]
            stats[kind] = {"planted": sum(1 for v in outcomes.values() if v[0] == kind),
                           "checkable": len(checkable), "detected": len(found),
                           "recall": round(len(found) / max(1, len(checkable)), 4),
                           "by_rule": {r: sum(1 for v in found if v[1] == r) for r in sorted({v[1] for v in found})}}
        all_checkable = stats["exact"]["checkable"] + stats["near"]["checkable"]
        all_found = stats["exact"]["detected"] + stats["near"]["detected"]
        planted = {(c + 1, o + 1) for c, o, _k in pairs} | {(o + 1, c + 1) for c, o, _k in pairs}
        dup_rejects = [r for r in rejects if r["rule"] in DEDUP_RULES]
        false_pos = [r for r in dup_rejects
                     if (r["line"], int(r["duplicate_of"].rsplit(":", 1)[1])) not in planted]
        precision = round(1 - len(false_pos) / max(1, len(dup_rejects)), 4)
        hard_lines = {i + 1 for a, b, _k in hard_pairs for i in (a, b)}
        hard_dropped = {r["rule"]: 0 for r in dup_rejects}
        for r in dup_rejects:
            if r["line"] in hard_lines:
                hard_dropped[r["rule"]] += 1
        print("planted pairs:", stats, "precision", precision, "hard negatives dropped", hard_dropped, flush=True)

        # 2. the embedding pass on its own, on every planted near pair and hard-negative pair
        model = embedding.default_model()
        cosine = embedding.threshold("static", None)

        def cosines(texts_a: list[str], texts_b: list[str]) -> np.ndarray:
            ea = embedding.encode(texts_a, len(texts_a), encoder="static", model_path=model, batch_size=64)
            eb = embedding.encode(texts_b, len(texts_b), encoder="static", model_path=model, batch_size=64)
            return (ea.astype(np.float32) * eb.astype(np.float32)).sum(axis=1)

        near_cos = cosines([a for a, _ in near_texts], [b for _, b in near_texts])
        hard_cos = cosines([a for a, _, _ in hard_texts], [b for _, b, _ in hard_texts])
        same = np.array([clean.literal_key(clean.normalize(a)) == clean.literal_key(clean.normalize(b))
                         for a, b, _ in hard_texts])
        kinds = [k for _, _, k in hard_texts]
        emb_alone = {
            "threshold": cosine, "near_pairs": len(near_texts), "hard_pairs": len(hard_texts),
            "near_recall": round(float((near_cos >= cosine).mean()), 4),
            "near_cosine_min": round(float(near_cos.min()), 4),
            "near_cosine_p1": round(float(np.percentile(near_cos, 1)), 4),
            "hard_dropped_with_literal_guard": int(((hard_cos >= cosine) & same).sum()),
            "hard_dropped_without_literal_guard": int((hard_cos >= cosine).sum()),
            "hard_cosine_max_by_kind": {k: round(float(max(c for c, kk in zip(hard_cos, kinds, strict=True)
                                                             if kk == k)), 4) for k in sorted(set(kinds))},
            "hard_cosine_max_same_literals": round(float(hard_cos[same].max()), 4) if same.any() else None,
        }
        print("embedding pass alone:", emb_alone, flush=True)

        st, cs = result.timings_s, result.cpu_s
        results = {
            "command": "PYTHONPATH=src python bench/data_prepare.py " + " ".join(sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version(),
                        "load_average_at_start": [round(x, 2) for x in load_before],
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                        "note": "2-core CPU VM shared with other jobs at the time; times include that contention"},
            "dataset": {"examples": n_rows, "bytes": size, "planted_exact": exact, "planted_near": near,
                        "hard_negative_pairs": args.hard,
                        "near_edit": "1-3 words replaced/inserted/deleted in the answer",
                        "exact_variants": "half verbatim, half upper-cased with doubled spaces",
                        "hard_negatives": "SQL queries differing in one column / number / city, products differing "
                                          "in one operand"},
            "prepare": {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "stages_s": st, "stages_cpu_s": cs,
                        "dedup_s": round(sum(st.get(k, 0) for k in ("exact_dedup", "minhash", "embedding_encode",
                                                                     "embedding")), 1),
                        "dedup_cpu_s": round(sum(cs.get(k, 0) for k in ("exact_dedup", "minhash", "embedding_encode",
                                                                         "embedding")), 1),
                        "train": result.train_examples, "eval": result.eval_examples, "rejected": result.rejected,
                        "removed_by_rule": result.removed_by_rule, "peak_rss_mb": rss_after_prepare,
                        "peak_rss_before_prepare_mb": rss_before_prepare,
                        "config": "defaults: minhash 0.7 / 128 perms / word 3-grams; embedding static encoder, "
                                  f"cosine {cosine}, literal guard, search auto"},
            "planted_pairs": stats,
            "recall_all_duplicates": round(all_found / max(1, all_checkable), 4),
            "duplicate_precision": precision, "false_positive_drops": len(false_pos),
            "hard_negatives_dropped_by_rule": hard_dropped,
            "embedding_alone": emb_alone,
            "process_cpu_s": round(time.process_time() - cpu_start, 1),
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"data_prepare_{args.tag}" if args.tag else "data_prepare"
        (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / f"{name}.md").write_text(_markdown(results))
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _markdown(r: dict) -> str:
    p, e, s = r["prepare"], r["embedding_alone"], r["planted_pairs"]
    st, cpu = p["stages_s"], p["stages_cpu_s"]

    def both(*names: str) -> str:
        return " / ".join(f"{st.get(n, 0):.1f}" for n in names) + " s wall (" + " / ".join(
            f"{cpu.get(n, 0):.1f}" for n in names) + " s CPU)"

    d = r["dataset"]
    rows = [
        ("examples (planted exact / near duplicates, hard-negative pairs)",
         f"{d['examples']:,} ({d['planted_exact']:,} / {d['planted_near']:,}, {d['hard_negative_pairs']:,})"),
        ("**whole default `prepare`** (target ≤ 5 min at 100k)", f"**{p['wall_s']} s wall ({p['cpu_s']} s CPU)**"),
        ("  read / validate / render (chat template)", both("read", "validate", "render")),
        ("  short outputs / over-long (tokenising)", both("short_outputs", "overlong")),
        ("  exact / MinHash", both("exact_dedup", "minhash")),
        ("  embedding: encode / search", both("embedding_encode", "embedding")),
        ("  leakage / write + report", both("leakage", "write_and_report")),
        ("removed by rule", ", ".join(f"{k} {v:,}" for k, v in p["removed_by_rule"].items())),
        ("**recall, all planted duplicates** (target ≥ 99%)", f"**{r['recall_all_duplicates']:.2%}**"),
        ("  exact copies", f"{s['exact']['recall']:.2%} ({s['exact']['detected']:,} of {s['exact']['checkable']:,})"),
        ("  near copies (by rule)", f"{s['near']['recall']:.2%} ({s['near']['detected']:,} of "
                                    f"{s['near']['checkable']:,}; " + ", ".join(
                                        f"{k} {v:,}" for k, v in s["near"]["by_rule"].items()) + ")"),
        ("**precision of duplicate drops** (target ≥ 99.5%)",
         f"**{r['duplicate_precision']:.2%}** ({r['false_positive_drops']} false)"),
        ("hard negatives dropped (of both rows of every pair)",
         ", ".join(f"{k} {v}" for k, v in r["hard_negatives_dropped_by_rule"].items()) or "none"),
        ("peak RSS after prepare (before it: generator, tokenizer, encoder cache check)",
         f"{p['peak_rss_mb']:,} MB ({p['peak_rss_before_prepare_mb']:,} MB)"),
        (f"embedding pass alone: recall of all {e['near_pairs']:,} planted near pairs (cos ≥ {e['threshold']})",
         f"{e['near_recall']:.2%} (min cosine {e['near_cosine_min']}, 1st percentile {e['near_cosine_p1']})"),
        (f"embedding pass alone: hard-negative pairs over the threshold (of {e['hard_pairs']:,})",
         f"{e['hard_dropped_with_literal_guard']} with the literal guard, {e['hard_dropped_without_literal_guard']} "
         "without"),
        ("  max cosine of hard-negative pairs by kind",
         ", ".join(f"{k} {v}" for k, v in e["hard_cosine_max_by_kind"].items())
         + f"; with equal literals {e['hard_cosine_max_same_literals']}"),
    ]
    m = r["machine"]
    return "\n".join([
        "# data prepare benchmark", "",
        f"Command: `{r['command']}`", "",
        f"Machine: {m['cpus']}-core CPU ({m['cpu']}), Python {m['python']}; load average at start "
        f"{m['load_average_at_start']}, at end {m['load_average_at_end']}. {m['note']}.", "",
        "| measure | result |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], "",
        "Notes:", "",
        "- Wall times depend on the other jobs sharing the two cores; CPU seconds (this process) are the stable "
        "measure. The embedding search and the encoder use both cores (usearch threads, the tokenizer), so their "
        "CPU seconds can exceed wall seconds on an idle machine.",
        "- The static encoder is distilled once per machine (about 20 s) and cached; the benchmark builds it before "
        "the timed run, as a second `prepare` on the same machine would find it.",
        "- Recall counts planted pairs of which one member was dropped as a duplicate of the other by any rule "
        "(leakage included: a copy whose original went to eval); pairs with both members in eval are not "
        "checkable. Precision counts every duplicate drop whose named original is not its planted partner as "
        "false — hard-negative rows dropped as copies of another hard-negative row are such drops.",
        "- Hard negatives dropped by the embedding rule are rows of different pairs that share their literals and "
        "differ in one repeated identifier (e.g. the same column in two tables: `SELECT signup_date FROM "
        "customers … ORDER BY signup_date` / `… FROM employees …`, cosine up to ~0.975); within a pair (one "
        "column, number, city or operand apart) none is dropped.",
        "",
    ])


if __name__ == "__main__":
    main()
