"""Helpers shared by the advisor's tests: catalogue architectures as transformers configs (no weights)."""

from __future__ import annotations

from tunesmith.hardware import catalog


def catalogue_config(name):
    from transformers import AutoConfig

    fields = catalog.config_dict(catalog.MODELS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


class PeakLiveBytes:
    """Peak bytes of tensor storage alive during a block, on any device (the CPU has no allocator statistics).

    A TorchDispatchMode sees every tensor an operator creates, forward and backward; each new storage is counted
    until Python frees it. Storages that existed before (weights, optimizer states) are passed in as the base.
    """

    def __init__(self, base_tensors):
        self.live: dict[int, int] = {}
        self.current = 0
        for tensor in base_tensors:
            self._add(tensor)
        self.peak = self.current

    def _add(self, tensor):
        import weakref

        import torch

        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        weakref.finalize(storage, self._drop, key)

    def _drop(self, key):
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    tracker._add(tensor)
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
