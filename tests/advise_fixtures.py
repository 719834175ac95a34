"""Helpers shared by the advisor's tests: catalogue architectures as transformers configs (no weights)."""

from __future__ import annotations

from tunesmith.advise import catalog


def catalogue_config(name):
    from transformers import AutoConfig

    fields = catalog.config_dict(catalog.MODELS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
