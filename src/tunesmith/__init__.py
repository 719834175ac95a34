"""tunesmith: fine-tune large language models correctly, from "should we?" to a served model."""

__version__ = "0.1.0"
