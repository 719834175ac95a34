"""Where llama.cpp's HF → GGUF converter comes from.

``convert_hf_to_gguf.py`` (with its ``conversion/`` package and the matching ``gguf-py``) is not part of the
installed llama-cpp-python package: it ships only in llama-cpp-python's source distribution, under
``vendor/llama.cpp/``. ``setup_converter`` takes those files (and nothing else) from the sdist of the INSTALLED
llama-cpp-python version, so the converter writes exactly the GGUF that the installed runtime reads, into
``$TUNESMITH_HOME/llama.cpp-<version>/`` (default ``~/.cache/tunesmith``). ``find_converter`` looks there, or at
``$TUNESMITH_GGUF_CONVERTER`` for a converter the user keeps elsewhere (a llama.cpp checkout).
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from .. import processes
from ..errors import RunError, UserError
from ..paths import home, input_file

SCRIPT = "convert_hf_to_gguf.py"
_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
"""What the converter needs at run time, relative to ``vendor/llama.cpp/`` in the sdist (~2 MB of ~75 MB)."""

SETUP_COMMAND = "tunesmith setup-gguf"


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version; a UserError with the install command when it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise UserError("GGUF export needs llama-cpp-python (llama.cpp's quantizer and runtime), which is not "
                        "installed", hint="pip install 'tunesmith[gguf]'  (compiles llama.cpp: a few minutes)",
                        ) from None


def converter_home() -> Path:
    return home() / f"llama.cpp-{llama_cpp_version()}"


def find_converter() -> Path:
    """Path of ``convert_hf_to_gguf.py`` matching the installed llama.cpp; a UserError saying how to get it."""
    override = os.environ.get("TUNESMITH_GGUF_CONVERTER")
    if override:
        path = Path(override)
        if not path.is_file():
            raise UserError(f"TUNESMITH_GGUF_CONVERTER={override}: file not found",
                            hint=f"point it to llama.cpp's {SCRIPT}, or unset it and run `{SETUP_COMMAND}`")
        return path
    path = converter_home() / SCRIPT
    if not path.is_file():
        raise UserError(f"llama.cpp's GGUF converter ({SCRIPT}) is not set up for llama-cpp-python "
                        f"{llama_cpp_version()}",
                        hint=f"run `{SETUP_COMMAND}` once (downloads the llama-cpp-python source distribution, keeps "
                             "the converter), or `tunesmith setup-gguf --sdist FILE.tar.gz` with a downloaded one")
    return path


def setup_converter(sdist: str | Path | None = None) -> Path:
    """Extract the converter from ``sdist`` (or from a freshly downloaded sdist of the installed version)."""
    version = llama_cpp_version()
    target = converter_home()
    with tempfile.TemporaryDirectory(prefix="tunesmith-sdist-") as tmp:
        archive = Path(sdist) if sdist is not None else _download_sdist(version, Path(tmp))
        input_file(archive, "--sdist" if sdist is not None else "",
                   hint="pass the llama_cpp_python-<version>.tar.gz sdist")
        staging = Path(tmp) / "converter"
        _extract(archive, staging)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), target)
    return target / SCRIPT


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(into)]
    log = converter_home().parent / f"download-llama.cpp-{version}.log"
    try:
        processes.run(cmd, what=f"pip download of llama-cpp-python {version}", log_path=log)
    except RunError as exc:
        raise RunError(f"could not download the llama-cpp-python {version} source distribution: {exc.message}",
                       hint="download it where there is network (pip download --no-deps --no-binary :all: "
                            f"llama-cpp-python=={version}) and run `{SETUP_COMMAND} --sdist FILE`") from None
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise RunError(f"pip downloaded no llama-cpp-python {version} source distribution; its output is in {log}",
                       hint=f"download it by hand and run `{SETUP_COMMAND} --sdist FILE`")
    return found[0]


def _extract(archive: Path, into: Path) -> None:
    """Copy the converter's files out of the sdist; refuse archives that are not llama-cpp-python's."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            wanted = []
            for member in tar.getmembers():
                parts = member.name.split("/", 1)
                inner = parts[1] if len(parts) == 2 else ""
                if not inner.startswith("vendor/llama.cpp/"):
                    continue
                relative = inner.removeprefix("vendor/llama.cpp/")
                if member.isfile() and any(relative == p or (p.endswith("/") and relative.startswith(p))
                                           for p in _PARTS):
                    member.name = relative
                    wanted.append(member)
            if not any(m.name == SCRIPT for m in wanted):
                raise UserError(f"{archive}: no vendor/llama.cpp/{SCRIPT} inside",
                                hint="pass llama-cpp-python's source distribution (llama_cpp_python-<version>.tar.gz)")
            tar.extractall(into, members=wanted, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"{archive}: not a readable .tar.gz ({exc})") from None
