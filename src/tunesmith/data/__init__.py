"""Data preparation: raw JSONL → validated, cleaned train/eval splits with a report (``tunesmith data prepare``).

``prepare`` is the stage; ``read_examples`` / ``read_numbered`` / ``load_prepared`` are the one reader of users' data
files that the train, eval and advise stages read with (every accepted format, the same line-numbered problems).
"""

from .prepare import PrepareResult, load_prepared, prepare
from .validate import read_examples, read_numbered

__all__ = ["PrepareResult", "load_prepared", "prepare", "read_examples", "read_numbered"]
