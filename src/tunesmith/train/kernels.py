"""Fast kernels for CUDA: variable-length attention for packed rows, fused linear + cross-entropy.

Each entry returns None where no fast kernel applies; the caller then uses the plain PyTorch path, which computes the
same function (tests/test_kernels.py on the CPU, tests/gpu/test_fast_path.py on a GPU check that).

Choices, measured on one H200 (bench/results/fast_engine.md):
- Attention for packed rows: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside torch,
  no extra package, no compilation). Each token attends only inside its own example and no compute is spent on
  padding or across examples. The alternative without it — SDPA with the block-diagonal mask transformers builds
  from position ids — computes the full row × row score matrix and masks most of it away.
- Output head + loss: Liger's fused linear cross-entropy, called as a function (no ``apply_liger_kernel_*``): it
  walks the supervised tokens in chunks, so the [tokens × 128K vocabulary] logits never exist at once.

Both plug in through public interfaces only: ``transformers.AttentionInterface.register`` and a direct function call.
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import cache, partial
from typing import Any

import torch

VARLEN_ATTENTION = "tunesmith_varlen"
"""The name our packed-row attention is registered under in transformers' AttentionInterface."""


def attention_implementation(device_type: str, packing: bool) -> str | None:
    """The attention implementation to load the model with; None keeps transformers' default (sdpa).

    CUDA + packing: our variable-length attention (registered on first use). Otherwise None: on the CPU transformers'
    sdpa builds a block-diagonal causal mask from the restarting position ids, which is exact but quadratic in the
    row length, and fine for the tiny models the CPU trains.
    """
    if device_type != "cuda" or not packing or _varlen_attn() is None:
        return None
    _register_varlen_attention()
    return VARLEN_ATTENTION


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Sum over rows of cross-entropy(``hidden @ weight.T``, ``targets``) from Liger's fused kernel (fp32
    accumulation), or None where it does not apply (not CUDA, Liger not installed) so the chunked PyTorch path runs.
    ``targets`` hold only real labels (the caller already dropped unsupervised positions)."""
    fused = _liger_flce() if hidden.is_cuda and hidden.shape[0] else None
    if fused is None:
        return None
    return fused(*_liger_operands(hidden, weight), targets, reduction="sum")


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """fp32 log-probability of each row's target under softmax(``hidden @ weight.T``) from Liger's fused kernel, or
    None where it does not apply (as ``linear_cross_entropy_sum``). Per-token (``reduction="none"``): Liger then
    defers the head's gradients to backward, recomputing its tiles with each token's own upstream gradient folded
    in, so DPO's per-sequence weights reach the hidden states (and a trained head) exactly."""
    fused = _liger_flce() if hidden.is_cuda and hidden.shape[0] else None
    if fused is None:
        return None
    return -fused(*_liger_operands(hidden, weight), targets, reduction="none")


def _liger_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Liger's kernel runs in the weight's dtype. Full fine-tuning keeps an fp32 master head under autocast: its
    compute-dtype copy (the cast is differentiable, so the fp32 head still receives the gradient)."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind) and weight.dtype == torch.float32:
        weight = weight.to(torch.get_autocast_dtype(kind))
    return (hidden.to(weight.dtype) if hidden.dtype != weight.dtype else hidden), weight


def fused_loss_kernel_available() -> bool:
    """Whether ``linear_cross_entropy_sum`` has a kernel here (a CUDA build of torch with Liger installed)."""
    return torch.cuda.is_available() and _liger_flce() is not None


# --- variable-length attention -------------------------------------------------------------------------------------


@cache
def _varlen_attn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@cache
def _varlen_options() -> tuple[dict[str, Any], bool, bool]:
    """(causal keyword, takes ``enable_gqa``, takes ``scale``) for the signature this torch has: torch 2.9–2.10
    take ``is_causal=True``; 2.11 and later express causality as ``window_size=(-1, 0)``, later ones add GQA.
    Read once at registration, outside any traced code."""
    params = inspect.signature(_varlen_attn()).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return causal, "enable_gqa" in params, "scale" in params


def _cu_seq_lens(kwargs: dict[str, Any], batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sequence starts of the flattened row(s): given by the caller, else derived from restarting position ids."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(device=device, dtype=torch.int32), kwargs.get("max_length_q") or length
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # one plain causal sequence per row
        starts = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
        return starts, length
    flat = position_ids.reshape(-1)
    begins = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([begins, torch.tensor([flat.numel()], device=flat.device)]).to(device=device, dtype=torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Causal attention inside each packed example; signature of transformers' attention functions.

    query [B, Hq, T, D], key/value [B, Hkv, T, D] → output [B, T, Hq, D]. Rows are flattened to one token stream with
    cumulative sequence starts, so examples are independent whatever row they share.
    """
    if attention_mask is not None or dropout or key.shape[2] != query.shape[2]:
        # padded rows with a mask (evaluation batches), attention dropout, or generation's decoding steps (queries
        # for new tokens against a key/value cache — task eval during training runs on this model):
        # transformers' own SDPA path
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        # fp32 master weights under autocast: the projections are bf16, but RoPE multiplies by the fp32 tables of
        # fp32 hidden states, so queries and keys come back fp32; the kernel takes the autocast dtype (as SDPA would)
        low = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(low), key.to(low), value.to(low)
    cu, max_len = _cu_seq_lens(kwargs, batch, length, query.device)
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    causal, gqa, takes_scale = _OPTIONS
    extra: dict[str, Any] = dict(causal)
    if kv_heads != heads:
        if gqa:
            extra["enable_gqa"] = True
        elif not _SHARED_KV_HEADS:  # a torch whose kernel needs as many key/value heads as query heads
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    if scaling is not None and abs(scaling - dim**-0.5) > 1e-12:
        if takes_scale:
            extra["scale"] = scaling
        else:  # a torch without ``scale`` applies 1/sqrt(dim): fold the model's own scale into the queries
            q = q * (scaling * dim**0.5)
    out = _VARLEN(q, k, v, cu, cu, max_len, max_len, **extra)
    return out.view(batch, length, heads, dim), None


_VARLEN: Any = None
_OPTIONS: tuple[dict[str, Any], bool, bool] = ({}, False, False)
_SHARED_KV_HEADS = False


@cache
def _register_varlen_attention() -> None:
    from transformers import AttentionInterface

    global _VARLEN, _OPTIONS, _SHARED_KV_HEADS
    _VARLEN, _OPTIONS = _varlen_attn(), _varlen_options()
    _SHARED_KV_HEADS = not _OPTIONS[1] and torch.cuda.is_available() and _takes_shared_kv_heads(_OPTIONS[0])
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)


def _takes_shared_kv_heads(causal: dict[str, Any]) -> bool:
    """Whether this torch's varlen kernel takes fewer key/value heads than query heads (grouped-query attention)
    without the ``enable_gqa`` flag later versions have: the FlashAttention-2 kernel inside supports them, and
    torch versions before the flag do not check. Then the key/value heads need not be expanded (4× their memory for
    Llama-3's 32 query / 8 key-value heads, saved for backward in every layer). Probed once, on a tiny input, forward
    and backward against the same heads expanded; any error or difference keeps the expansion."""
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(64, heads, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for heads in (4, 2, 2))
        cu = torch.tensor([0, 40, 64], device="cuda", dtype=torch.int32)
        grads = []
        for expand in (False, True):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            keys, values = (kk.repeat_interleave(2, dim=1), vv.repeat_interleave(2, dim=1)) if expand else (kk, vv)
            out = _varlen_attn()(qq, keys, values, cu, cu, 40, 40, **causal)
            out.float().square().sum().backward()
            grads.append((out, qq.grad, kk.grad, vv.grad))
        return all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(*grads, strict=True))
    except (RuntimeError, ValueError, TypeError):
        return False


# --- fused linear + cross-entropy ----------------------------------------------------------------------------------


@cache
def _liger_flce() -> Any:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    if "chunk_mem_const" in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        # Liger's default chunk is tokens / ceil(V / d) rows (128 rows for 4K tokens of a 128K vocabulary): small
        # matmuls. 4× that keeps the transient logits at ~4 × tokens × d bf16 (128 MB for 8K tokens at d 4096).
        return partial(liger_fused_linear_cross_entropy, chunk_mem_const=4)
    return liger_fused_linear_cross_entropy
