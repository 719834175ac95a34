"""`import tunesmith` exposes the stages as functions, lazily: importing it loads no torch, each name is the stage's
own function (or, for train / evaluate / advise, the stage package, which calls its function)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import tunesmith

SRC = str(Path(__file__).resolve().parents[1] / "src")

FUNCTIONS = {"load_config": "tunesmith.config", "prepare": "tunesmith.data", "merge": "tunesmith.export",
             "to_gguf": "tunesmith.export.gguf", "to_awq": "tunesmith.export.awq", "run": "tunesmith.pipeline"}
TYPES = {"Config": "tunesmith.config", "UserError": "tunesmith.errors", "RunError": "tunesmith.errors",
         "TunesmithError": "tunesmith.errors", "PrepareResult": "tunesmith.data", "TrainResult": "tunesmith.train",
         "EvalReport": "tunesmith.evaluate", "MergeResult": "tunesmith.export", "GgufResult": "tunesmith.export.gguf",
         "AwqResult": "tunesmith.export.awq", "Advice": "tunesmith.advise", "PipelineResult": "tunesmith.pipeline"}
STAGES = ("train", "evaluate", "advise")


def _python(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_importing_tunesmith_and_its_light_names_loads_no_torch():
    out = _python("import sys, tunesmith; tunesmith.load_config; tunesmith.UserError; tunesmith.Config; "
                  "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    assert out == "[]"


@pytest.mark.parametrize("name", sorted({**FUNCTIONS, **TYPES}))
def test_each_exported_name_is_the_stage_modules_own_object(name):
    home = {**FUNCTIONS, **TYPES}[name]
    assert getattr(tunesmith, name) is getattr(import_module(home), name)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_package_called_as_a_function_calls_its_entry_function(stage, monkeypatch):
    package = getattr(tunesmith, stage)
    assert package is sys.modules[f"tunesmith.{stage}"]
    assert inspect.signature(package) == inspect.signature(getattr(package, stage))
    calls = []
    monkeypatch.setattr(package, stage, lambda *a, **k: calls.append((a, k)) or "result")
    assert package("config", out_dir="x") == "result"
    assert calls == [(("config",), {"out_dir": "x"})]


def test_the_stage_packages_are_callable_whatever_was_imported_first():
    # a submodule imported before `tunesmith.train` is looked at binds the package as the attribute: still callable
    out = _python("from tunesmith.train.checkpoint import latest; import tunesmith, inspect; "
                  "print(callable(tunesmith.train), 'config' in inspect.signature(tunesmith.train).parameters, "
                  "tunesmith.train.checkpoint.latest is latest)")
    assert out == "True True True"


def test_dir_lists_the_api_and_an_unknown_name_is_an_attribute_error():
    assert set(FUNCTIONS) | set(TYPES) | set(STAGES) <= set(dir(tunesmith))
    assert dir(tunesmith) == sorted(tunesmith.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'trian'"):
        tunesmith.trian  # noqa: B018
