"""Pinned CPU memory for what a step keeps off the GPU, allocated once before the first step and reused by every step.

Offloaded activations (src/tunesmith/train/offload.py) and input-embedding rows looked up in CPU memory
(src/tunesmith/train/loss.py) need page-locked CPU memory for their copies to overlap the GPU's work. Asked for
tensor by tensor, torch's caching host allocator page-locks each new size the first time it is seen (cudaHostAlloc:
seconds for the GBs of an 8B step) and rounds it up to a power of two, so packed rows of varying lengths keep
finding sizes it has not cached yet: measured on one H200, an 8B LoRA step reached its steady time only after ~8
steps. Here the plan sizes the memory once (``pinned_sizes``, a pure function of the plan's layers, its row budget
and the model's shape) and ``PinnedPool`` takes it from torch's allocator before step 1, as fixed slots:

- one slot per offloaded group (one layer's tensors: a checkpointed layer's inputs, or everything a layer offloaded
  whole saves), taken when the layer's forward saves its first tensor and given back when autograd drops the group
  after its backward. Reuse needs no event: the next copy into a slot is queued behind the compute stream, which
  has waited for every copy back of the groups it used (offload.py);
- two slots for input-embedding rows, used in turn; the CPU writes into one only after its previous copy to the GPU
  has finished (an event).

A tensor that does not fit its slot, or a group that finds no free slot, gets its memory from torch's allocator as
before, and is counted (``PinnedPool.misses``): a plan that sized the slots too small is visible in the run's
numbers, never wrong.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .offload import SMALLEST_OFFLOADED  # tensors under it stay on the GPU: they take no slot space

ALIGN = 4096
"""Each tensor in a slot starts on a 4 KiB boundary (a page; any dtype's alignment, and DMA-friendly)."""

LAYER_MARGIN = 1.1
"""A layer offloaded whole saves what the memory model's per-layer activation term says, within its error: 10% more
room before the allocator's rounding (which adds up to 2× on top)."""

ROW_BUFFERS = 2
"""Input-embedding buffers used in turn: the CPU fills one while the other's copy to the GPU may still run."""

KINDS = ("checkpoint", "layer", "rows")


@dataclass(frozen=True)
class PinnedSizes:
    """The pinned CPU memory one step of a plan uses, as slots of three kinds (counts and bytes per slot; bytes as
    torch's host allocator rounds them: the next power of two)."""

    checkpoint_slots: int
    """Checkpointed layers whose inputs wait in CPU memory: one slot each."""
    checkpoint_slot_bytes: int
    layer_slots: int
    """Layers offloaded whole: one slot each."""
    layer_slot_bytes: int
    row_slots: int
    """Buffers for input-embedding rows looked up in CPU memory (0 when the embeddings are on the GPU)."""
    row_slot_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.checkpoint_slots * self.checkpoint_slot_bytes + self.layer_slots * self.layer_slot_bytes
                + self.row_slots * self.row_slot_bytes)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / 2**30

    def slots(self, kind: str) -> tuple[int, int]:
        """(count, bytes per slot) of ``kind`` (one of KINDS)."""
        return {"checkpoint": (self.checkpoint_slots, self.checkpoint_slot_bytes),
                "layer": (self.layer_slots, self.layer_slot_bytes),
                "rows": (self.row_slots, self.row_slot_bytes)}[kind]

    def describe(self) -> str:
        parts = [f"{n} × {_size(b)} {what}" for n, b, what in (
            (self.checkpoint_slots, self.checkpoint_slot_bytes, "layer inputs"),
            (self.layer_slots, self.layer_slot_bytes, "offloaded layers"),
            (self.row_slots, self.row_slot_bytes, "embedding rows")) if n]
        return f"{self.total_gib:.1f} GiB of pinned CPU memory up front ({', '.join(parts)})"


def pinned_sizes(*, hidden_size: int, head_dim: int, tokens: int, element_bytes: int, checkpointed_inputs: int,
                 offloaded_layers: int, layer_bytes: float, embedding_rows: bool) -> PinnedSizes | None:
    """The slots a step needs, or None where it keeps nothing in CPU memory.

    ``tokens``: the largest micro-batch (the plan's row budget); ``element_bytes``: the hidden states' dtype
    (bf16 for LoRA/QLoRA, fp32 for full fine-tuning's fp32 residual stream); ``checkpointed_inputs``: checkpointed
    layers whose inputs are offloaded; ``layer_bytes``: what one layer offloaded whole saves (the memory model's
    per-layer activations at ``tokens``). A checkpointed layer's inputs over the 1 MiB floor are its hidden states
    and the rotary cos and sin (tokens × head_dim each): for the 8B shape at 12,288 tokens in bf16,
    96 MiB + 2 × 3 MiB = 102 MiB, a 128 MiB slot."""
    if not (checkpointed_inputs or offloaded_layers or embedding_rows):
        return None
    hidden = tokens * hidden_size * element_bytes
    rotary = tokens * head_dim * element_bytes
    inputs = _aligned(hidden) + (2 * _aligned(rotary) if rotary >= SMALLEST_OFFLOADED else 0)
    return PinnedSizes(
        checkpoint_slots=checkpointed_inputs, checkpoint_slot_bytes=allocator_bytes(inputs) if checkpointed_inputs
        else 0,
        layer_slots=offloaded_layers,
        layer_slot_bytes=allocator_bytes(int(layer_bytes * LAYER_MARGIN)) if offloaded_layers else 0,
        row_slots=ROW_BUFFERS if embedding_rows else 0,
        row_slot_bytes=allocator_bytes(_aligned(hidden)) if embedding_rows else 0)


def allocator_bytes(size: int) -> int:
    """What torch's caching host allocator reserves for ``size`` bytes: the next power of two (it caches blocks by
    power-of-two size; c10 CachingHostAllocator)."""
    return 1 << max(0, size - 1).bit_length()


class Slot:
    """One pinned block, filled from its start by ``carve`` and emptied as a whole by ``clear``."""

    __slots__ = ("memory", "used")

    def __init__(self, memory: torch.Tensor) -> None:
        self.memory = memory  # a flat uint8 tensor
        self.used = 0

    def carve(self, shape: torch.Size | tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype
              ) -> torch.Tensor | None:
        """A tensor of ``shape`` and ``stride`` (a dense layout: offload.py copies only those) in the slot's free
        part, or None where it does not fit."""
        size = _numel(shape) * dtype.itemsize
        if self.used + size > self.memory.numel():
            return None
        start, self.used = self.used, self.used + _aligned(size)
        flat = self.memory[start:start + size].view(dtype)
        return flat.as_strided(shape, stride)

    def clear(self) -> None:
        self.used = 0


class PinnedPool:
    """The slots of ``sizes``, allocated at construction (``reserve_s``: how long page-locking took). ``allocate``
    makes one block of n bytes (default: torch's pinned memory; tests pass plain CPU memory) and ``event`` one
    marker on the current stream (default: a CUDA event)."""

    def __init__(self, sizes: PinnedSizes, *, allocate: Callable[[int], torch.Tensor] | None = None,
                 event: Callable[[], Any] | None = None) -> None:
        allocate = allocate or _pinned_block
        self.sizes = sizes
        self._event = event or torch.cuda.Event
        started = time.perf_counter()
        self._free: dict[str, list[Slot]] = {
            kind: [Slot(allocate(sizes.slots(kind)[1])) for _ in range(sizes.slots(kind)[0])]
            for kind in ("checkpoint", "layer")}
        self._rows = [Slot(allocate(sizes.row_slot_bytes)) for _ in range(sizes.row_slots)]
        self.reserve_s = time.perf_counter() - started
        self._row_sent: list[Any] = [None] * len(self._rows)
        self._next_row = 0
        self._pending_row: int | None = None
        self.misses = 0  # tensors (or groups) that got memory outside the pool
        self.miss_bytes = 0

    def take(self, group: object, kind: str) -> Slot | None:
        """A free slot of ``kind`` for ``group``, given back when ``group`` is garbage (after its backward); None
        where every slot is taken (the group's tensors then count as misses)."""
        free = self._free[kind]
        if not free:
            return None
        slot = free.pop()
        slot.clear()
        weakref.finalize(group, free.append, slot)
        return slot

    def missed(self, nbytes: int) -> None:
        self.misses += 1
        self.miss_bytes += nbytes

    def free_slots(self, kind: str) -> int:
        return len(self._free[kind])

    def rows(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A contiguous buffer for a micro-batch's input-embedding rows (the next slot in turn, once its previous
        copy to the GPU has finished), or None where the pool has none or they are too small. Call ``rows_sent``
        after queueing the copy."""
        self._pending_row = None
        if not self._rows:
            return None
        i = self._next_row
        self._next_row = (i + 1) % len(self._rows)
        if self._row_sent[i] is not None:
            self._row_sent[i].synchronize()  # the CPU writes into it next: the GPU must have read it
            self._row_sent[i] = None
        slot = self._rows[i]
        slot.clear()
        buffer = slot.carve(shape, _contiguous_stride(shape), dtype)
        if buffer is None:
            self.missed(_numel(shape) * dtype.itemsize)
            return None
        self._pending_row = i
        return buffer

    def rows_sent(self) -> None:
        """The copy from the buffer ``rows`` handed out is queued on the current stream."""
        if self._pending_row is None:
            return
        marker = self._event()
        marker.record()
        self._row_sent[self._pending_row] = marker
        self._pending_row = None

    def stats(self) -> dict[str, Any]:
        """For the run's events and benchmarks: what was reserved, how long it took, what missed."""
        return {"pinned_gib": round(self.sizes.total_gib, 2), "pinned_reserve_s": round(self.reserve_s, 2),
                "pinned_misses": self.misses, "pinned_miss_gib": round(self.miss_bytes / 2**30, 3)}


def host_memory_available_gib() -> float | None:
    """CPU memory the kernel can give without swapping (``MemAvailable`` of /proc/meminfo); None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        return None
    return None


def _pinned_block(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:g} MiB"
