"""The training loss: cross-entropy on supervised tokens only, as a SUM (the loop divides by the step's count).

Fused path (default when the model allows it): run the decoder, keep only the hidden states of supervised positions,
and compute the output projection + cross-entropy in chunks, recomputed in backward. The full
[tokens × vocabulary] logits tensor (4 GB in fp32 for 8K tokens of a 128K vocabulary) never exists, and no
compute is spent on logits of prompt tokens. Plain path: the model's own forward and logits, used where the output
head is not a plain linear layer (LoRA on lm_head, logit soft-capping or scaling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..chat import IGNORE_INDEX
from ..models import base_model
from .batching import MicroBatch
from .distributed import is_sharded

if TYPE_CHECKING:
    from .pinned import PinnedPool

CHUNK_TOKENS = 4096
"""Supervised tokens per chunk of the fused path: 4096 × 128,256 × 4 bytes = 2.1 GB of fp32 logits at most."""


def fused_head_supported(model: Any) -> bool:
    """True if logits are exactly ``hidden @ lm_head.weight.T`` (so the fused path is numerically the same)."""
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cfg = getattr(base, "config", None)
    if head is None or type(head) is not torch.nn.Linear or getattr(head, "bias", None) is not None:
        return False
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return hasattr(base, "get_decoder")


def loss_sum(model: Any, batch: MicroBatch, fused: bool, kernel: bool = True, *, pinned: PinnedPool | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of correct argmax predictions) over the batch's supervised tokens.
    ``kernel=False`` keeps the fused path on plain PyTorch chunks even where a fused kernel is installed.
    ``pinned``: the run's pinned memory, whose buffers receive input-embedding rows looked up in CPU memory."""
    base = base_model(model)
    kwargs = _attention_kwargs(batch) | _inputs(base, batch, pinned)
    if fused:
        hidden = _final_hidden_states(model, base, batch, kwargs)
        keep = batch.targets != IGNORE_INDEX
        return linear_cross_entropy(hidden[keep], base.get_output_embeddings().weight, batch.targets[keep], kernel)
    logits = model(position_ids=batch.position_ids, attention_mask=batch.attention_mask, use_cache=False,
                   **kwargs).logits.float()
    flat_t = batch.targets.reshape(-1)
    flat_l = logits.reshape(-1, logits.shape[-1])
    total = F.cross_entropy(flat_l, flat_t, ignore_index=IGNORE_INDEX, reduction="sum")
    keep = flat_t != IGNORE_INDEX
    correct = (flat_l[keep].argmax(-1) == flat_t[keep]).sum()
    return total, correct


def _final_hidden_states(model: Any, base: Any, batch: MicroBatch, kwargs: dict[str, Any]) -> torch.Tensor:
    """The decoder's output (after its final norm), without logits. One process runs the decoder alone. Under FSDP2
    the root module's own forward must run (it gathers the root's weights and waits for the layers' collectives),
    so the whole model runs, asked for no logits at all (an empty ``logits_to_keep``), and the decoder's output is
    read by a forward hook on the decoder — not through ``output_hidden_states``, whose per-layer recording hooks
    run inside each compiled layer (measured on two H200s: 2.5× slower steps). The head's weight stays gathered
    after the root's forward (src/tunesmith/train/distributed.py), so the loss reads it as a plain tensor and its
    gradient reaches FSDP2's reduction like any other."""
    decoder = base.get_decoder()
    if not is_sharded(model):
        return decoder(position_ids=batch.position_ids, attention_mask=batch.attention_mask, use_cache=False,
                       **kwargs).last_hidden_state
    seen: list[torch.Tensor] = []
    hook = decoder.register_forward_hook(lambda _module, _args, out: seen.append(out.last_hidden_state))
    try:
        model(position_ids=batch.position_ids, attention_mask=batch.attention_mask, use_cache=False,
              logits_to_keep=torch.empty(0, dtype=torch.long, device=batch.position_ids.device), **kwargs)
    finally:
        hook.remove()
    return seen[0]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kernel: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropies of ``hidden @ weight.T`` against ``targets``: a fused kernel where one applies
    (the correct-prediction count is then not computed: 0), else chunked and recomputed in backward."""
    from .kernels import linear_cross_entropy_sum

    fast = linear_cross_entropy_sum(hidden, weight, targets) if kernel else None
    if fast is not None:
        return fast, torch.zeros((), device=hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        h = hidden[start:start + CHUNK_TOKENS]
        t = targets[start:start + CHUNK_TOKENS]
        chunk_loss, chunk_correct = checkpoint(_chunk_loss, h, weight, t, use_reentrant=False)
        total = total + chunk_loss
        correct = correct + chunk_correct
    return total, correct


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (h @ weight.t()).float()
    return F.cross_entropy(logits, t, reduction="sum"), (logits.argmax(-1) == t).sum()


def _inputs(base: Any, batch: MicroBatch, pinned: PinnedPool | None = None) -> dict[str, torch.Tensor]:
    """The token ids — or, where the plan keeps the frozen input embeddings in CPU memory, their rows looked up
    there and sent to the GPU (no gradient flows to frozen embeddings; checkpointing is non-reentrant).

    The lookup reads the batch's own CPU copy of the ids (asking the GPU for them would wait for all its queued
    work), a plain ``nn.Embedding`` gathers straight into pinned memory — one of ``pinned``'s row buffers where the
    run allocated them up front, else a block of torch's caching host allocator — and the copy to the GPU is queued
    without waiting: the GPU keeps working on what came before while the CPU looks tokens up."""
    embeddings = base.get_input_embeddings()
    ids = batch.input_ids
    if embeddings is None or embeddings.weight.device == ids.device:
        return {"input_ids": ids}
    host = batch.host_input_ids if batch.host_input_ids is not None else ids.to(embeddings.weight.device)
    with torch.no_grad():
        if type(embeddings) is torch.nn.Embedding and embeddings.max_norm is None and ids.device.type == "cuda":
            shape = (*host.shape, embeddings.embedding_dim)
            rows = pinned.rows(shape, embeddings.weight.dtype) if pinned is not None else None
            if rows is None:
                rows = torch.empty(shape, dtype=embeddings.weight.dtype, pin_memory=True)
            torch.index_select(embeddings.weight, 0, host.reshape(-1), out=rows.view(-1, rows.shape[-1]))
        else:  # a subclass may scale or otherwise transform its rows: its own forward
            rows = embeddings(host)
    sent = rows.to(ids.device, non_blocking=rows.is_pinned())
    if pinned is not None:
        pinned.rows_sent()
    return {"inputs_embeds": sent}


def _attention_kwargs(batch: MicroBatch) -> dict[str, Any]:
    """Variable-length attention metadata for packed rows (the names transformers' flash/varlen paths read)."""
    if batch.cu_seq_lens is None:
        return {}
    return {"cu_seq_lens_q": batch.cu_seq_lens, "cu_seq_lens_k": batch.cu_seq_lens,
            "max_length_q": batch.max_seq_len, "max_length_k": batch.max_seq_len}
