"""Eval loss, perplexity and mean token accuracy of the expected answers.

Computed on the supervised tokens only — the labels ``tunesmith.chat.tokenize_chat`` gives training (the assistant
answer and its end-of-turn token) — so these numbers are comparable with the training run's eval loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..chat import IGNORE_INDEX, tokenize_chat
from .evalset import EvalExample


def answer_loss(model: Any, tokenizer: Any, examples: Sequence[EvalExample], batch_size: int = 8,
                max_length: int | None = None) -> dict[str, float]:
    """Mean token loss (summed over every supervised token, then divided by their count), its perplexity, and the
    fraction of supervised tokens the model predicts exactly (greedy next-token accuracy)."""
    import torch
    import torch.nn.functional as F

    chats = [tokenize_chat(tokenizer, ex.conversation(), tools=ex.tools) for ex in examples]
    if max_length:
        chats = [type(c)(c.input_ids[:max_length], c.labels[:max_length]) for c in chats]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(chats), batch_size):
            batch = chats[start:start + batch_size]
            width = max(len(c.input_ids) for c in batch)
            # right padding: nothing is generated here, and padded positions carry no label
            ids = torch.tensor([c.input_ids + [pad] * (width - len(c.input_ids)) for c in batch], device=device)
            labels = torch.tensor([c.labels + [IGNORE_INDEX] * (width - len(c.labels)) for c in batch], device=device)
            mask = (torch.arange(width, device=device)[None, :]
                    < torch.tensor([len(c.input_ids) for c in batch], device=device)[:, None]).long()
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            total_loss += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="sum").item()
            supervised = targets != IGNORE_INDEX
            correct += int(((logits.argmax(-1) == targets) & supervised).sum())
            count += int(supervised.sum())
    finally:
        model.train(was_training)
    mean = total_loss / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "token_accuracy": correct / max(count, 1),
            "supervised_tokens": count}
