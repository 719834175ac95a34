"""Hooks (`module:function` scorers, extractors, generators) resolve only to functions of the user's project or of
tunesmith: the standard library, builtins, installed packages and re-exports of them are refused (exit 2) before
anything is called."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunesmith
from tunesmith import cli, hooks
from tunesmith.errors import UserError
from tunesmith.evaluate.metrics import build_scorer

PROJECT_MODULE = """\
import os
import subprocess
from os import system, makedirs
from subprocess import run
from yaml import safe_load
from builtins import eval

def make_dir(folder, **options):
    os.makedirs(folder)

def score(prediction, expected):
    return prediction == expected

shell = os.system
"""

REFUSED = [
    ("builtins:eval", "standard library"),
    ("os:system", "standard library"),
    ("os:makedirs", "standard library"),
    ("subprocess:run", "standard library"),
    ("importlib:import_module", "standard library"),
    ("json:loads", "standard library"),
    ("yaml:safe_load", "installed package"),
    ("my_hooks:system", "not a function defined in 'my_hooks'"),  # re-exported builtin of os
    ("my_hooks:shell", "not a function defined in 'my_hooks'"),
    ("my_hooks:eval", "not a function defined in 'my_hooks'"),
    ("my_hooks:os", "not a function defined in 'my_hooks'"),  # a module
    ("my_hooks:makedirs", "standard library"),  # a Python function of os, re-exported
    ("my_hooks:run", "standard library"),
    ("my_hooks:safe_load", "installed package"),
]


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "my_hooks.py").write_text(PROJECT_MODULE)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_hooks", None)  # each test's project has its own my_hooks.py


@pytest.mark.parametrize(("spec", "reason"), REFUSED)
def test_a_hook_outside_the_project_is_refused_naming_field_value_and_fix(project, spec, reason):
    with pytest.raises(UserError) as info:
        build_scorer("custom", {"function": spec}, "eval.metrics[0]")
    assert info.value.message.startswith(f"eval.metrics[0].function: {spec!r}")
    assert reason in info.value.message
    assert "my_scorers.py next to the config" in info.value.hint


def test_a_refused_module_is_not_even_imported(project):
    (project / "not_mine").mkdir()
    (project / "not_mine" / "site-packages").mkdir()
    planted = project / "not_mine" / "site-packages" / "planted_pkg.py"
    planted.write_text(f"open({str(project / 'imported')!r}, 'w').close()\ndef f(p, e):\n    return True\n")
    sys.path.insert(0, str(planted.parent))
    try:
        with pytest.raises(UserError, match="installed package"):
            hooks.resolve("planted_pkg:f", "eval.metrics[0].function")
    finally:
        sys.path.remove(str(planted.parent))
    assert not (project / "imported").exists() and "planted_pkg" not in sys.modules


def test_project_functions_and_tunesmiths_own_still_resolve(project):
    assert hooks.resolve("my_hooks:score", "f")("a", "a") is True
    from tunesmith.demo import write_demo

    assert hooks.resolve("tunesmith.demo:write_demo", "pipeline.generate") is write_demo


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in this process through its real entry point (``main(argv)``: error → message + exit code)."""
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("spec", ["os:makedirs", "my_hooks:makedirs", "subprocess:run", "builtins:eval"])
def test_run_refuses_a_generator_hook_with_exit_2_and_never_calls_it(project, capsys, spec):
    made = project / "made"
    config = project / "tunesmith.yaml"
    config.write_text(f"out_dir: {project / 'run'}\npipeline:\n  generate: '{spec}'\n  generate_dir: {made}\n")
    code, err = _cli(["run", str(config)], capsys)
    assert code == 2, err
    assert f"pipeline.generate: {spec!r}" in err and "Traceback" not in err
    assert not made.exists()  # os.makedirs(generate_dir) would have made it


@pytest.mark.parametrize(("spec", "reason"), REFUSED)
def test_eval_refuses_a_scorer_hook_with_exit_2(project, capsys, spec, reason):
    config = project / "tunesmith.yaml"
    config.write_text(f"eval:\n  dataset: {project / 'none.jsonl'}\n  metrics:\n    - type: custom\n"
                      f"      function: '{spec}'\n")
    code, err = _cli(["eval", str(config), "--out", str(project / "out")], capsys)
    assert code == 2, err
    assert reason in err and "Traceback" not in err


def test_a_shell_command_as_generator_is_refused_in_a_fresh_process_and_never_runs(project):
    env = {**os.environ, "PYTHONPATH": str(Path(tunesmith.__file__).parents[1])}
    marker = project / "pwned"
    config = project / "tunesmith.yaml"
    config.write_text(f"out_dir: {project / 'run'}\npipeline:\n  generate: 'os:system'\n"
                      f"  generate_dir: 'touch {marker}'\n")
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "run", str(config)], capture_output=True, text=True,
                          cwd=project, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pipeline.generate: 'os:system' names 'os', a module of Python's standard library" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
