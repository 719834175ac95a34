"""Activations kept in CPU memory between forward and backward, copied there and back while the GPU computes.

Two placements share one mechanism (saved-tensor hooks whose copies run on side streams):

- a **checkpointed** layer keeps one tensor for backward, its input hidden states (tokens × hidden × 2 bytes:
  96 MiB per layer for 12K tokens of an 8B model, 3 GiB for its 32 layers); ``offloaded_checkpoint`` is torch's
  non-reentrant checkpoint with that input in pinned CPU memory, the rest recomputed as usual;
- an **offloaded** layer is not recomputed at all: everything its forward saves for backward (~1.5 GiB per layer
  at 12K tokens for the 8B shape) goes to CPU memory and comes back before its backward (``offloaded_layer``). It
  costs copy bandwidth instead of a forward's FLOPs, so a few of them, spread between checkpointed layers, hide
  their copies behind the neighbours' compute (the plan decides how many: src/tunesmith/train/plan.py).

How the copies overlap:

- forward: each tensor is copied to the CPU on a side stream once the layer has produced it, while the GPU goes on
  with the next layers; the allocator is told not to reuse its GPU memory until the side stream has read it;
- backward: a layer's saved tensors form one group. When backward asks for a group, the groups of the
  ``PREFETCH_GROUPS`` layers before it (the next ones backward needs; at most one offloaded whole) start coming back
  on a second side stream, overlapping this layer's recomputation and backward; the compute stream waits only for
  the copy it needs.

CPU memory: with a ``PinnedPool`` (src/tunesmith/train/pinned.py, sized by the plan and allocated before step 1),
each group's tensors go to one pinned slot, reused step after step; without one, each tensor gets a block of torch's
caching host allocator (page-locked the first time each power-of-two size is seen).

Weights are never moved (an offloaded layer's parameters and buffers, looked up at each call: wherever they live
now), nor tensors under 1 MiB, nor tensors whose elements are not one dense block (they stay where they are). The
hooks run outside ``torch.utils.checkpoint.checkpoint``, so for a checkpointed layer they see only what checkpoint
saves itself (the layer's inputs). transformers ≥ 5.2x offers the checkpointed placement with
``torch.autograd.graph.save_on_cpu``, whose copies run on the compute stream and wait for it; measured side by side
in bench/fast_engine.py (``offload=sync``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from .pinned import PinnedPool, Slot

SMALLEST_OFFLOADED = 1 << 20
"""Tensors under 1 MiB stay where they are: copying them costs more than it frees."""

PREFETCH_GROUPS = 2
"""Layers whose saved tensors start coming back while backward works on the current one: two, so that an offloaded
layer's ~1.5 GiB has two neighbours' recomputation and backward to arrive in."""


class _Group:
    """One layer's tensors in CPU memory, linked to the group saved before it (the next one backward needs). Only
    the autograd graph holds it (through its ``_Saved`` handles): the links are weak, so a forward abandoned
    without backward leaves nothing behind."""

    __slots__ = ("__weakref__", "cpu", "device", "gpu", "loaded", "previous", "slot", "stored", "whole_layer")

    def __init__(self, device: torch.device, previous: Callable[[], _Group | None], whole_layer: bool) -> None:
        self.device, self.previous, self.whole_layer = device, previous, whole_layer
        self.cpu: list[torch.Tensor] = []
        self.slot: Slot | None = None  # the pinned memory its tensors are copied into, where a pool gave one
        self.gpu: list[torch.Tensor | None] | None = None  # set while fetched, cleared item by item as used
        self.stored: Any = None  # event: every copy to the CPU so far has finished
        self.loaded: Any = None  # event: the copies back have finished

    @property
    def fetched(self) -> bool:
        return self.gpu is not None


class _Saved:
    """What autograd keeps for one offloaded tensor: its group and its place in it."""

    __slots__ = ("__weakref__", "group", "item")

    def __init__(self, group: _Group, item: int) -> None:
        self.group, self.item = group, item


class ActivationOffloader:
    """The pack / unpack pair for ``torch.autograd.graph.saved_tensors_hooks``, and the grouping of a layer's
    tensors (``group()``). ``pool``: the pinned memory allocated up front (src/tunesmith/train/pinned.py), one slot
    per group; without it, each tensor's CPU memory comes from torch's caching host allocator."""

    def __init__(self, pool: PinnedPool | None = None) -> None:
        self.pool = pool
        self._weights: set[int] = set()
        self._last: Callable[[], _Group | None] = _nothing
        self._open: _Group | None = None
        self._grouping = False
        self._whole_layer = False
        # the open group's tensors by identity: the same tensor saved twice is copied once. Holding them until the
        # group closes keeps their memory from being reused by a look-alike tensor of the same layer meanwhile.
        self._seen: dict[tuple[Any, ...], tuple[int, torch.Tensor]] = {}
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self.offloaded = 0  # tensors moved so far (tests and benchmarks read it)
        self.offloaded_bytes = 0

    @contextmanager
    def group(self, weights: Iterable[torch.Tensor] = (), whole_layer: bool = False) -> Iterator[None]:
        """Tensors packed inside belong to one group (one layer), fetched back together; ``weights`` (the layer's
        parameters and buffers) and views of them are left where they are. ``whole_layer``: everything the layer
        saves (not a checkpointed layer's input) — backward fetches at most one such group ahead of time."""
        self._open, self._grouping, self._whole_layer = None, True, whole_layer
        self._weights = {w.untyped_storage().data_ptr() for w in weights}
        try:
            yield
        finally:
            self._open, self._grouping, self._whole_layer = None, False, False
            self._seen.clear()
            self._weights = set()

    def pack(self, tensor: torch.Tensor) -> Any:
        if (tensor.numel() * tensor.element_size() < SMALLEST_OFFLOADED or tensor.is_sparse
                or not _one_dense_block(tensor)):
            return tensor
        storage = tensor.untyped_storage().data_ptr()
        if storage in self._weights:
            return tensor
        group = self._group_for(tensor.device)
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor._version)
        if key in self._seen:
            return _Saved(group, self._seen[key][0])
        if tensor.device.type == "cuda":
            to_cpu, _ = self._side_streams(tensor.device)
            to_cpu.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(to_cpu):
                cpu = self._host_memory(group, tensor)
                cpu.copy_(tensor.detach(), non_blocking=True)
                tensor.record_stream(to_cpu)  # its memory is not reused before the copy has read it
                group.stored = torch.cuda.Event()
                group.stored.record(to_cpu)
        else:  # CPU training: a plain copy (the same path, without streams)
            cpu = self._host_memory(group, tensor)
            cpu.copy_(tensor.detach())
        item = len(group.cpu)
        group.cpu.append(cpu)
        if self._grouping:
            self._seen[key] = (item, tensor)
        self.offloaded += 1
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return _Saved(group, item)

    def unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        group = saved.group
        if not group.fetched:
            self._fetch(group)
        ahead = group.previous()
        for _ in range(PREFETCH_GROUPS):  # the layers backward needs next, copied while this one computes
            if ahead is None:
                break
            if not ahead.fetched:
                self._fetch(ahead)
            if ahead.whole_layer:  # at most one offloaded layer arriving ahead of time (what the plan counts)
                break
            ahead = ahead.previous()
        if group.loaded is not None:
            torch.cuda.current_stream(group.device).wait_event(group.loaded)
        tensor = group.gpu[saved.item]
        if tensor is None:  # asked for a second time (a graph kept for another backward): copied again
            tensor = group.cpu[saved.item].to(group.device)
        group.gpu[saved.item] = None  # from here on only backward holds it
        return tensor

    def _group_for(self, device: torch.device) -> _Group:
        if self._grouping and self._open is not None:
            return self._open
        group = _Group(device, self._last, self._whole_layer)
        if self.pool is not None:
            group.slot = self.pool.take(group, "layer" if self._whole_layer else "checkpoint")
        self._last = weakref.ref(group)
        if self._grouping:
            self._open = group
        return group

    def _host_memory(self, group: _Group, tensor: torch.Tensor) -> torch.Tensor:
        """Where ``tensor`` waits for backward: its group's slot of the pool, else memory of its own (pinned on a
        GPU; counted as a miss where a pool was meant to hold it)."""
        if group.slot is not None:
            room = group.slot.carve(tensor.shape, tensor.stride(), tensor.dtype)
            if room is not None:
                return room
        if self.pool is not None:
            self.pool.missed(tensor.numel() * tensor.element_size())
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                   pin_memory=tensor.device.type == "cuda")

    def _fetch(self, group: _Group) -> None:
        if group.device.type != "cuda":
            group.gpu = list(group.cpu)
            return
        _, to_gpu = self._side_streams(group.device)
        compute = torch.cuda.current_stream(group.device)
        # allocated on the compute stream, which waits for the copy before its first use
        gpu = [torch.empty_strided(c.shape, c.stride(), dtype=c.dtype, device=group.device) for c in group.cpu]
        to_gpu.wait_stream(compute)  # the blocks may have been freed by work still queued there
        to_gpu.wait_event(group.stored)
        with torch.cuda.stream(to_gpu):
            for g, c in zip(gpu, group.cpu, strict=True):
                g.copy_(c, non_blocking=True)
            group.loaded = torch.cuda.Event()
            group.loaded.record(to_gpu)
        group.gpu = gpu

    def _side_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]


@cache
def host_link_rate(device: torch.device) -> float:
    """Bytes per second a 256 MiB copy from ``device`` to pinned CPU memory runs at (best of three; measured once
    per device): what the plan spends on layers offloaded whole."""
    gpu = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    cpu = torch.empty(gpu.shape, dtype=torch.uint8, pin_memory=True)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        cpu.copy_(gpu, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return gpu.numel() / best


def _nothing() -> None:
    return None


def _one_dense_block(tensor: torch.Tensor) -> bool:
    """Its elements fill one block of memory with no gaps or overlaps, in some order of dimensions (a copy made
    with the same strides then holds exactly them)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def offloaded_checkpoint(offloader: ActivationOffloader) -> Callable[..., Any]:
    """A checkpoint function for transformers' per-layer switch (``GradientCheckpointingLayer``'s
    ``_gradient_checkpointing_func``): non-reentrant checkpointing whose saved inputs ``offloader`` keeps."""

    @torch.compiler.disable(recursive=False)  # the hooks run eagerly; the layer inside may still be compiled
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with offloader.group(), torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return run


def offloaded_layer(offloader: ActivationOffloader, layer: torch.nn.Module) -> Callable[..., Any]:
    """The same switch's function for ``layer`` when it is not recomputed: everything it saves for backward but its
    own weights waits in CPU memory (one group)."""

    @torch.compiler.disable(recursive=False)
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        weights = (*layer.parameters(), *layer.buffers())
        with offloader.group(weights, whole_layer=True), \
                torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
            return function(*args, **kwargs)

    return run


def synchronous_offloaded_checkpoint() -> Callable[..., Any]:
    """The checkpointed placement with torch's own ``save_on_cpu`` (copies on the compute stream; what
    transformers ≥ 5.2x does with offload=True): the benchmark's control arm."""

    @torch.compiler.disable(recursive=False)
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return run
