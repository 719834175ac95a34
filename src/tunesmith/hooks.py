"""What a ``module:function`` in a config (a custom scorer, an ``extract_answer``, ``pipeline.generate``) may name.

A hook is called with text the model wrote (a scorer gets the prediction) or with a path from the config, so a
config that may name any importable function turns model output into an action: ``builtins:eval`` runs it as
Python, ``os:system`` as a shell command. A config is often copied from elsewhere; the hook field alone must not
reach code that was not written to be a hook. So a hook resolves only to a plain Python function whose code lies

- in tunesmith itself (``tunesmith.demo:write_demo``), or
- in the user's project: a module under the working directory, outside any installed-packages folder
  (a ``.venv`` inside the project holds installed packages, not the project).

Refused, each with one UserError naming the field, the value and the fix: the standard library and builtins
(``sys.stdlib_module_names``: ``os``, ``subprocess``, ``sys``, ``importlib``, ``pickle``…), installed third-party
packages (site-packages), modules outside the project, and a name that is not a function defined there (a module,
a builtin, a class, or a standard-library function the project module merely imports). Modules are located before
they are imported, so a refused module's code never runs; a project module is the user's own code and is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import site
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

_FIX = ("put your function in a module of your project, e.g. my_scorers.py next to the config, and run tunesmith "
        "from that folder; to use a library function, call it from a function of your own")


def resolve(spec: str, field: str) -> Callable[..., Any]:
    """The function ``spec`` (``module:function``) names, if it may be a hook; a UserError naming ``field`` if not."""
    module_name, _, attr = spec.partition(":")
    if not _is_dotted_name(module_name) or not attr.isidentifier():
        raise UserError(f"{field}: {spec!r} is not `module:function`", hint="e.g. function: my_scorers:score_sql")
    top = module_name.partition(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__":
        raise UserError(f"{field}: {spec!r} names {top!r}, a module of Python's standard library; a hook may only "
                        "be a function of your project or of tunesmith", hint=_FIX)
    cwd = Path.cwd().resolve()
    added = str(cwd) not in sys.path
    if added:
        sys.path.insert(0, str(cwd))
    try:
        _check_before_import(module_name, spec, field, cwd)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"{field}: cannot import module {module_name!r} ({exc})",
                            hint="run from the folder holding the module") from None
        except Exception as exc:  # the user's module failed while importing: report it, no traceback
            raise UserError(f"{field}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(cwd))
    function = vars(module).get(attr)
    if function is None:
        raise UserError(f"{field}: {module_name!r} has no function {attr!r}")
    if not inspect.isfunction(function):
        raise UserError(f"{field}: {spec!r} is a {type(function).__name__}, not a function defined in "
                        f"{module_name!r}; a hook must be a plain Python function (def) of your project", hint=_FIX)
    source = function.__code__.co_filename
    where = (_refusal(Path(source), cwd) if os.path.isabs(source) and os.path.isfile(source)
             else f"in generated code ({source})")
    if (function.__module__ or "").partition(".")[0] in sys.stdlib_module_names:
        where = f"in Python's standard library ({function.__module__})"
    if where:
        raise UserError(f"{field}: {spec!r} is {function.__module__}.{function.__qualname__}, defined {where}; a "
                        "hook must be a function defined in your project or in tunesmith", hint=_FIX)
    return function


def _check_before_import(module_name: str, spec: str, field: str, cwd: Path) -> None:
    """Locate each level of ``a.b.c`` without running it; finding ``a.b`` runs only ``a``, already checked."""
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError) as exc:
            raise UserError(f"{field}: cannot import module {name!r} ({exc})",
                            hint="run from the folder holding the module") from None
        if found is None:
            raise UserError(f"{field}: cannot import module {name!r} (no such module here)",
                            hint="run from the folder holding the module") from None
        if found.origin is None or not found.has_location:
            continue  # a namespace package (a plain folder): no code of its own; what is inside is checked
        where = _refusal(Path(found.origin), cwd)
        if where:
            raise UserError(f"{field}: {spec!r} names {name!r}, {where}; a hook may only be a function of your "
                            "project or of tunesmith", hint=_FIX)


def _refusal(path: Path, cwd: Path) -> str | None:
    """Why code at ``path`` may not be a hook (a phrase for the message), or None when it may."""
    path = path.resolve()
    if path.is_relative_to(_TUNESMITH):
        return None
    # installed packages first: a base interpreter keeps its site-packages inside the standard library's folder
    if any(part in ("site-packages", "dist-packages") for part in path.parts) or any(
            path.is_relative_to(d) for d in _installed_packages()):
        return f"an installed package ({path})"
    if any(path.is_relative_to(d) for d in _standard_library()):
        return f"in Python's standard library ({path})"
    if not path.is_relative_to(cwd):
        return f"outside your project (the working directory {cwd}): {path}"
    return None


_TUNESMITH = Path(__file__).resolve().parent


def _standard_library() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths[k]).resolve() for k in ("stdlib", "platstdlib")]


def _installed_packages() -> list[Path]:
    paths = sysconfig.get_paths()
    found = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    return [Path(p).resolve() for p in found if os.path.isdir(p)]


def _is_dotted_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))
