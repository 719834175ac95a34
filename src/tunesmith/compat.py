"""Differences between the supported versions of transformers and PEFT, decided here and nowhere else.

Each difference is an explicit ``packaging.version`` comparison with the versions it was checked on; the callers ask
this module instead of probing objects with ``hasattr``. Every entry has a test in ``tests/test_compat.py`` that
fails when upstream renames or removes the thing (or fixes what a workaround works around), so an upgrade breaks a
test, not a training run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from typing import Any

from packaging.version import Version


@cache
def installed(distribution: str) -> Version:
    """The installed version of ``distribution`` (e.g. ``"transformers"``)."""
    return Version(version(distribution))


@dataclass(frozen=True)
class CheckpointingMethods:
    """The names of ``PreTrainedModel``'s activation-checkpointing switch in one transformers version."""

    enable: str
    disable: str
    kwargs: str
    """The keyword of ``enable`` that is passed on to ``torch.utils.checkpoint.checkpoint``."""


ACTIVATION_CHECKPOINTING_NAMES = Version("5.24")
"""transformers renamed ``gradient_checkpointing_enable/disable`` to ``activation_checkpointing_enable/disable``
between 5.18 (the old names only) and 5.24 (the new ones, the old kept as deprecated aliases until v6): from 5.24 on
the new names are used, so no FutureWarning is raised; before it the old ones, which every version up to v6 has."""


def checkpointing_methods(transformers: Version) -> CheckpointingMethods:
    """How to switch activation checkpointing on and off in ``transformers``."""
    if transformers >= ACTIVATION_CHECKPOINTING_NAMES:
        return CheckpointingMethods("activation_checkpointing_enable", "activation_checkpointing_disable",
                                    "activation_checkpointing_kwargs")
    return CheckpointingMethods("gradient_checkpointing_enable", "gradient_checkpointing_disable",
                                "gradient_checkpointing_kwargs")


def enable_checkpointing(model: Any) -> None:
    """transformers' own checkpointing on every decoder layer, non-reentrant (works with frozen inputs and LoRA)."""
    names = checkpointing_methods(installed("transformers"))
    getattr(model, names.enable)(**{names.kwargs: {"use_reentrant": False}})


def disable_checkpointing(model: Any) -> None:
    getattr(model, checkpointing_methods(installed("transformers")).disable)()


PEFT_READS_IS_GRADIENT_CHECKPOINTING = "0.21"
"""PEFT releases (``major.minor``) that read transformers' deprecated ``is_gradient_checkpointing`` when they wrap a
model, which warns (FutureWarning) on every LoRA run: the CLI silences that one warning for them."""


def peft_warns_on_wrap(peft: Version) -> bool:
    """Whether ``get_peft_model`` in this PEFT raises transformers' ``is_gradient_checkpointing`` FutureWarning."""
    return f"{peft.major}.{peft.minor}" == PEFT_READS_IS_GRADIENT_CHECKPOINTING
