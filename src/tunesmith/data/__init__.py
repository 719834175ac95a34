"""Data preparation: raw JSONL → validated, cleaned train/eval splits with a report (``tunesmith data prepare``).

``prepare`` is the stage; ``read_examples`` / ``load_prepared`` are what the train and eval stages read with.
"""

from .prepare import PrepareResult, load_prepared, prepare, read_examples

__all__ = ["PrepareResult", "load_prepared", "prepare", "read_examples"]
