"""Deployable artefacts from a run: a merged model, GGUF (llama.cpp / Ollama), AWQ (vLLM), each checked against
what was evaluated by its real consumer."""

from .merge import MergeResult, Parity, merge

__all__ = ["MergeResult", "Parity", "merge"]
