"""serve: which engine serves an artefact (the endpoint itself is tested in tests/server/test_chat.py)."""

from __future__ import annotations

import pytest

from tunesmith import serve
from tunesmith.errors import UserError


def test_a_model_folder_is_served_by_transformers_on_loopback(tiny_model_dir):
    plan = serve.plan(tiny_model_dir, port=8123)
    assert plan.spec.engine == "transformers" and plan.spec.path == str(tiny_model_dir)
    assert plan.base_url == "http://127.0.0.1:8123/v1" and plan.spec.name == tiny_model_dir.name


def test_a_folder_without_a_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a GGUF file, model folder"):
        serve.plan(tmp_path)


def test_missing_artefact_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        serve.plan(tmp_path / "nothing")
