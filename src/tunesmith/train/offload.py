"""Checkpointed layers' inputs kept in CPU memory, copied there and back while the GPU computes.

A checkpointed decoder layer keeps one tensor for backward: its input hidden states (tokens × hidden × 2 bytes:
64 MiB per layer for 8K tokens of an 8B model, 2 GiB for its 32 layers); everything else is recomputed.
``offloaded_checkpoint`` is torch's non-reentrant checkpoint with that input moved to pinned CPU memory:

- forward: the copy to the CPU runs on a side stream after the layer's input is computed, while the GPU goes on with
  the layer; the allocator is told not to reuse the GPU copy until the side stream has read it;
- backward: when a layer's recomputation asks for its input, the input of the layer before it (the next one
  backward needs) is already being copied back on a second side stream, overlapping this layer's recompute and
  backward; the compute stream waits only for the copy it needs.

The saved-tensor hooks are entered outside ``torch.utils.checkpoint.checkpoint``, so they see only what checkpoint
saves itself (the layer's inputs); the tensors saved inside the layer go to checkpoint's own hooks and are
recomputed as usual. transformers ≥ 5.2x offers the same placement with ``torch.autograd.graph.save_on_cpu``, whose
copies run on the compute stream and wait for it; measured side by side in bench/fast_engine.py (``offload=sync``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

SMALLEST_OFFLOADED = 1 << 20
"""Inputs under 1 MiB stay where they are: copying them costs more than it frees."""


class _Offloaded:
    """One layer input in CPU memory, linked to the input saved before it (the next one backward needs). Only the
    autograd graph holds it: the links are weak, so a forward abandoned without backward leaves nothing behind."""

    __slots__ = ("__weakref__", "cpu", "device", "gpu", "loaded", "previous", "stored", "used")

    def __init__(self, cpu: torch.Tensor, device: torch.device, stored: Any, previous: Any) -> None:
        self.cpu, self.device, self.stored = cpu, device, stored
        self.previous: Callable[[], _Offloaded | None] = previous
        self.loaded: Any = None
        self.gpu: torch.Tensor | None = None
        self.used = False


class InputOffloader:
    """The pack / unpack pair for ``torch.autograd.graph.saved_tensors_hooks`` around checkpointed layers."""

    def __init__(self) -> None:
        self._last: Callable[[], _Offloaded | None] = _nothing
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self.offloaded = 0  # inputs moved so far (tests and benchmarks read it)

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor.numel() * tensor.element_size() < SMALLEST_OFFLOADED:
            return tensor
        device = tensor.device
        if device.type == "cuda":
            to_cpu, _ = self._side_streams(device)
            to_cpu.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(to_cpu):
                cpu = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                cpu.copy_(tensor.detach(), non_blocking=True)
                tensor.record_stream(to_cpu)  # its memory is not reused before the copy has read it
                stored = torch.cuda.Event()
                stored.record(to_cpu)
        else:  # CPU training: a plain copy (the same path, without streams)
            cpu, stored = tensor.detach().clone(), None
        saved = _Offloaded(cpu, device, stored, self._last)
        self._last = weakref.ref(saved)
        self.offloaded += 1
        return saved

    def unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.gpu is None:
            self._fetch(saved)
        ahead = saved.previous()
        if ahead is not None and not ahead.used and ahead.gpu is None:
            self._fetch(ahead)  # the next input backward will ask for, copied while this layer recomputes
        if saved.loaded is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.loaded)
        tensor, saved.gpu, saved.used = saved.gpu, None, True
        return tensor

    def _fetch(self, saved: _Offloaded) -> None:
        if saved.device.type != "cuda":
            saved.gpu = saved.cpu
            return
        _, to_gpu = self._side_streams(saved.device)
        compute = torch.cuda.current_stream(saved.device)
        # allocated on the compute stream, which waits for the copy before its first use
        gpu = torch.empty(saved.cpu.shape, dtype=saved.cpu.dtype, device=saved.device)
        to_gpu.wait_stream(compute)  # the block may have been freed by work still queued there
        to_gpu.wait_event(saved.stored)
        with torch.cuda.stream(to_gpu):
            gpu.copy_(saved.cpu, non_blocking=True)
            saved.loaded = torch.cuda.Event()
            saved.loaded.record(to_gpu)
        saved.gpu = gpu

    def _side_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]


def _nothing() -> None:
    return None


def offloaded_checkpoint(offloader: InputOffloader) -> Callable[..., Any]:
    """A checkpoint function for transformers' per-layer switch (``GradientCheckpointingLayer``'s
    ``_gradient_checkpointing_func``): non-reentrant checkpointing whose saved inputs ``offloader`` keeps."""

    @torch.compiler.disable(recursive=False)  # the hooks run eagerly; the layer inside may still be compiled
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return run


def synchronous_offloaded_checkpoint() -> Callable[..., Any]:
    """The same placement with torch's own ``save_on_cpu`` (copies on the compute stream; what transformers ≥ 5.2x
    does with ``offload=True``): the benchmark's control arm."""

    @torch.compiler.disable(recursive=False)
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return run
