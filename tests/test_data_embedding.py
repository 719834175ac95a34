"""The embedding near-duplicate rule: the static encoder distilled from the shipped MiniLM (cached), the exact and
approximate greedy searches, the literal guard, the cache, and config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunesmith.data import clean, embedding
from tunesmith.errors import UserError

PARAPHRASES = [
    "user: How do I reset my password?\nassistant: Open Settings, choose Account, then click Reset password and "
    "follow the emailed link.",
    "user: What is the capital of France?\nassistant: The capital of France is Paris, its largest city.",
    "user: How can I reset my password?\nassistant: Go to Settings, pick Account, then click Reset password and "
    "follow the link in the email.",
    "user: Write SQL counting orders per customer.\nassistant: SELECT customer_id, COUNT(*) FROM orders GROUP BY "
    "customer_id;",
]

ANSWER = ("To renew a library card, bring a photo identity document and a recent utility bill to any branch desk. "
          "The librarian checks both, updates the address on file, and prints a new card while you wait. Renewal "
          "is free for residents; people living outside the county pay a small yearly fee at the same desk.")

# answers that share a template but are different answers: none of them may be dropped
HARD_NEGATIVES = [
    ("List the city of every supplier located in Prague.", "SELECT city FROM suppliers WHERE city = 'Prague';"),
    ("List the country of every supplier located in Prague.", "SELECT country FROM suppliers WHERE city = 'Prague';"),
    ("List the name of every supplier located in Prague.", "SELECT name FROM suppliers WHERE city = 'Prague';"),
    ("How many products have an id greater than 61593?", "SELECT COUNT(*) FROM products WHERE id > 61593;"),
    ("How many products have an id greater than 61596?", "SELECT COUNT(*) FROM products WHERE id > 61596;"),
    ("Show the email of customers in Berlin, sorted by email.",
     "SELECT email FROM customers WHERE city = 'Berlin' ORDER BY email;"),
    ("Show the email of customers in Madrid, sorted by email.",
     "SELECT email FROM customers WHERE city = 'Madrid' ORDER BY email;"),
    ("What is 417 times 23?", "417 × 23 = 9591."),
    ("What is 417 times 24?", "417 × 24 = 10008."),
]


def _static(texts: list[str], **kw) -> np.ndarray:
    return embedding.encode(texts, len(texts), encoder="static", model_path=embedding.default_model(),
                            batch_size=64, **kw)


def _groups(texts: list[str]) -> np.ndarray:
    return np.array([clean.literal_key(clean.normalize(t)) for t in texts], dtype=np.int64)


def test_the_static_encoder_finds_paraphrases_and_edited_copies_and_keeps_template_siblings():
    edited = ANSWER.replace("bring", "take").replace("small yearly", "modest annual")
    texts = [*PARAPHRASES, f"user: How do I renew my card?\nassistant: {ANSWER}",
             *(f"user: {q}\nassistant: {a}" for q, a in HARD_NEGATIVES),
             f"user: How do I renew my card?\nassistant: {edited}"]
    emb = _static(texts)
    assert emb.dtype == np.float16 and np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
    cosine = embedding.threshold("static", None)
    for search in ("exact", "approximate"):
        dups = embedding.duplicates(emb, cosine, search, _groups(texts))
        # the paraphrase (2 of 0) and the edited copy (last of 4) go; every template sibling stays
        assert {i: m.of for i, m in dups.items()} == {2: 0, len(texts) - 1: 4}, search
    leaks = embedding.matches(emb[[1, 2, 3]], emb[[0]], cosine, "exact", _groups(texts)[[1, 2, 3]],
                              _groups(texts)[[0]])
    assert list(leaks) == [1]


def test_without_the_literal_guard_queries_that_differ_in_a_number_look_like_copies():
    texts = [f"user: {q}\nassistant: {a}" for q, a in HARD_NEGATIVES[3:5]]
    emb = _static(texts)
    assert float(emb[0].astype(np.float32) @ emb[1].astype(np.float32)) > embedding.threshold("static", None)
    assert embedding.duplicates(emb, 0.96, "exact") == {1: embedding.Match(0, pytest.approx(
        float(emb[0].astype(np.float32) @ emb[1].astype(np.float32)), abs=1e-3), "embedding")}
    assert embedding.duplicates(emb, 0.96, "exact", _groups(texts)) == {}


def test_the_transformer_encoder_is_still_there():
    emb = embedding.encode(PARAPHRASES, len(PARAPHRASES), encoder="transformer",
                           model_path=embedding.default_model(), batch_size=4)
    assert list(embedding.duplicates(emb, 0.95, "exact")) == [2]


def _naive_greedy(emb: np.ndarray, threshold: float, groups: np.ndarray | None = None) -> dict[int, int]:
    """The definition: row i goes when its best cosine to an earlier kept row of its group is ≥ threshold."""
    x = emb.astype(np.float32)
    kept: list[int] = []
    out = {}
    for i in range(len(x)):
        pool = [j for j in kept if groups is None or groups[j] == groups[i]]
        if pool:
            sims = x[pool] @ x[i]
            if sims.max() >= threshold:
                out[i] = pool[int(sims.argmax())]
                continue
        kept.append(i)
    return out


def _clustered(rng: np.random.Generator, n: int, dim: int = 64) -> np.ndarray:
    """Rows around 300 centres, some clusters large (up to ~60 copies), in random order."""
    centres = rng.standard_normal((300, dim))
    sizes = rng.zipf(1.6, 300).clip(1, 60)
    which = rng.permutation(np.repeat(np.arange(300), sizes))[:n]
    x = centres[which] + rng.standard_normal((len(which), dim)) * rng.choice([0.05, 0.6], len(which))[:, None]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_exact_and_approximate_search_both_follow_the_greedy_definition(monkeypatch):
    monkeypatch.setattr(embedding, "BLOCK", 64)  # several blocks, so rows meet kept rows of earlier blocks
    rng = np.random.default_rng(0)
    emb = _clustered(rng, 1500)
    want = _naive_greedy(emb, 0.9)
    assert 100 < len(want) < len(emb) - 100  # big clusters and many singles: the test can fail
    exact = {i: m.of for i, m in embedding.duplicates(emb, 0.9, "exact").items()}
    assert exact == want
    # the HNSW graph is built by several threads at once, so which candidates it proposes can vary from run to run
    # (a suite under load once missed one of 1,500 rows' nearest kept row): the same decisions for all but 0.5%
    approximate = {i: m.of for i, m in embedding.duplicates(emb, 0.9, "approximate").items()}
    assert _differing(approximate, want) <= 0.005 * len(emb)
    groups = rng.integers(0, 3, len(emb))
    grouped = {i: m.of for i, m in embedding.duplicates(emb, 0.9, "approximate", groups).items()}
    assert _differing(grouped, _naive_greedy(emb, 0.9, groups)) <= 0.005 * len(emb)


def _differing(got: dict[int, int], want: dict[int, int]) -> int:
    """Rows whose decision differs: dropped by one side only, or dropped as a copy of another row."""
    return sum(got.get(i) != want.get(i) for i in got.keys() | want.keys())


def test_search_is_exact_for_small_sets_and_approximate_for_large_ones():
    assert embedding.search_method(embedding.EXACT_MAX, "auto") == "exact"
    assert embedding.search_method(embedding.EXACT_MAX + 1, "auto") == "approximate"
    assert embedding.search_method(10, "approximate") == "approximate"
    assert embedding.search_method(10**7, "exact") == "exact"


def test_literal_keys_compare_numbers_and_quoted_strings_not_apostrophes():
    key = clean.literal_key
    assert key("id > 61593 and city = 'Paris'") == key("city = 'Paris' and id > 61593")
    assert key("id > 61593") != key("id > 61596") and key("city = 'Paris'") != key("city = 'Rome'")
    assert key("don't do it, it's late") == key("do not do it, it is late")  # no literals in either


def _tiny_sentence_model(folder):
    """A 2-layer BERT with a WordPiece tokenizer trained here: a sentence-transformers-shaped folder in a second."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([t for t in PARAPHRASES * 5], trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    import torch

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return folder


def test_the_static_encoder_is_distilled_once_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    source = str(_tiny_sentence_model(tmp_path / "st"))
    built = embedding.static_model(source)
    record = json.loads((built / embedding.STATIC_RECORD).read_text())
    weights = built / "model.safetensors"
    assert record["files"]["model.safetensors"] and built.parent == tmp_path / "home" / "encoders"
    first = embedding.encode(PARAPHRASES, 4, encoder="static", model_path=source, batch_size=4)
    stamp = weights.stat().st_mtime_ns
    assert embedding.static_model(source) == built and weights.stat().st_mtime_ns == stamp  # reused, not rebuilt

    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)  # a damaged file of the same size
    assert embedding.static_model(source) == built and weights.stat().st_mtime_ns != stamp
    again = embedding.encode(PARAPHRASES, 4, encoder="static", model_path=source, batch_size=4)
    assert np.array_equal(first, again)  # distillation is deterministic: the rebuilt encoder is the same
    (built / embedding.STATIC_RECORD).unlink()  # a killed write leaves no record: rebuilt too
    assert embedding.static_model(source) == built and (built / embedding.STATIC_RECORD).is_file()


def test_a_model_that_is_not_a_folder_is_one_message(tmp_path):
    with pytest.raises(UserError, match=r"data.embedding.model: .*nope does not exist") as err:
        embedding.model_folder(str(tmp_path / "nope"))
    assert "all-MiniLM-L6-v2" in (err.value.hint or "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a model folder"):
        embedding.model_folder(str(tmp_path / "empty"))


def test_an_unknown_encoder_is_a_config_error_naming_the_key(tmp_path, capsys):
    from tunesmith.cli import main

    cfg = tmp_path / "ts.yaml"
    cfg.write_text("data:\n  embedding:\n    encoder: fast\n")
    assert main(["data", "prepare", str(cfg), str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ts.yaml:3" in err and "data.embedding.encoder" in err and "'static' or 'transformer'" in err
    assert "Traceback" not in err


def test_prepare_drops_the_edited_copy_keeps_the_siblings_and_says_how_it_compared(tmp_path, tiny_model_dir):
    from data_cases import config, read_jsonl, write_jsonl
    from tunesmith.data import prepare

    edited = ANSWER.replace("bring", "take").replace("small yearly", "modest annual")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("How do I renew my card?", ANSWER), *HARD_NEGATIVES, ("How do I renew my card?", edited)]]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    result = prepare(config(tiny_model_dir, eval_fraction=0, embedding={"enabled": True, "search": "approximate"},
                            minhash={"enabled": False}, short_outputs={"min_tokens": 1}), [src], tmp_path / "o")
    assert result.removed_by_rule["embedding"] == 1 and result.train_examples == len(rows) - 1
    [reject] = read_jsonl(tmp_path / "o" / "rejects.jsonl")
    assert (reject["line"], reject["duplicate_of"]) == (len(rows), f"{src}:1")
    note = json.loads((tmp_path / "o" / "report.json").read_text())["rules"]["embedding"]["note"]
    assert note == "static encoder, cosine ≥ 0.96, same numbers and quoted strings, search approximate"
