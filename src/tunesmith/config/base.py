"""The base every config section derives from: strict, frozen, each field documented once (its docstring)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section. Unknown keys are errors (a typo never becomes a silent default); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, use_attribute_docstrings=True,
                              validate_default=True)
