"""tunesmith: fine-tune large language models correctly, from "should we?" to a served model.

Every stage is a Python function as well as a command, imported on first use (``import tunesmith`` loads neither
torch nor transformers)::

    import tunesmith

    config = tunesmith.load_config("tunesmith.yaml")
    prepared = tunesmith.prepare(config)            # PrepareResult
    trained = tunesmith.train(config)               # TrainResult
    report = tunesmith.evaluate(config, models=["base", trained.out_dir])
    merged = tunesmith.merge(trained.out_dir, "merged/")
    gguf = tunesmith.to_gguf("merged/", "gguf/", "q4_k_m")
    result = tunesmith.run(config)                  # the whole pipeline

``tunesmith.train``, ``tunesmith.evaluate`` and ``tunesmith.advise`` are the stage packages of those names; calling
one calls its entry function (``tunesmith.train(config)`` is ``tunesmith.train.train(config)``), so their modules
(``tunesmith.train.loop``) stay reachable under the same names. A failure the user can fix raises ``UserError``.
"""

from __future__ import annotations

import inspect
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "tunesmith.config": ("load_config", "Config"),
    "tunesmith.errors": ("UserError", "RunError", "TunesmithError"),
    "tunesmith.data": ("prepare", "PrepareResult"),
    "tunesmith.train": ("TrainResult",),
    "tunesmith.evaluate": ("EvalReport",),
    "tunesmith.export": ("merge", "MergeResult"),
    "tunesmith.export.gguf": ("to_gguf", "GgufResult"),
    "tunesmith.export.awq": ("to_awq", "AwqResult"),
    "tunesmith.advise": ("Advice",),
    "tunesmith.pipeline": ("run", "PipelineResult"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
_STAGE_PACKAGES = ("train", "evaluate", "advise")
"""Stage packages named like their entry function: the package itself is exported, and calling it calls the
function (``StageModule``)."""

__all__ = sorted([*_HOME, *_STAGE_PACKAGES, "StageModule", "__version__"])


class StageModule(types.ModuleType):
    """A stage package that is also its entry function: calling ``tunesmith.train`` calls ``tunesmith.train.train``.

    Set as the package's module class by the package itself (Python's documented ``module.__class__`` assignment),
    so it holds however the package was first imported."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._entry()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._entry())

    def _entry(self) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])


def __getattr__(name: str) -> Any:
    if name in _STAGE_PACKAGES:
        return import_module(f"{__name__}.{name}")
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value  # once imported, found without this function
    return value


def __dir__() -> list[str]:
    return list(__all__)
