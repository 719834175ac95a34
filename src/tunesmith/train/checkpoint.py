"""Resumable checkpoints, written atomically and verified on load.

A checkpoint is written into ``checkpoints/.tmp-<step>``, every file is fsynced and listed with its sha256 in
``checkpoint.json`` (written last), then the folder is renamed to ``checkpoints/step-<step>``. A crash mid-write
leaves only a ``.tmp-`` folder, which is ignored; a renamed checkpoint whose files no longer match their checksums
is skipped with a warning. Trainable weights are safetensors; optimizer/scheduler/RNG states are loaded with
``torch.load(weights_only=True)`` (no arbitrary unpickling).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import RunError
from ..records import sha256_file
from .distributed import Processes, barrier

log = logging.getLogger(__name__)

INDEX = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(root: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any],
         keep: int | None, procs: Processes | None = None) -> Path:
    """Write checkpoint ``step`` atomically; prune to the newest ``keep``. Disk-full is a RunError.

    One process: trainable weights as safetensors + optimizer/scheduler/RNG states. Several (FSDP2): every process
    writes its shards with torch.distributed.checkpoint, then the main process seals and renames the folder."""
    procs = procs or Processes(0, 1, 0, torch.device("cpu"))
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step}"
    final = root / f"step-{step}"
    if procs.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(procs)
    try:
        if procs.distributed:
            _save_sharded(tmp, model, optimizer, procs)
            torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / f"states-{procs.rank}.pt")
        else:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": _rng_state()}, tmp / "states.pt")
        barrier(procs)
        if procs.main:
            _seal(tmp, final, root, step, state)
        barrier(procs)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(f"disk full while writing checkpoint {step} in {root}; the previous checkpoint is intact",
                           hint="free disk space or lower train.save_total_limit, then resume with --resume") from None
        raise RunError(f"could not write checkpoint {step} in {root}: {exc}") from None
    if procs.main:
        _prune(root, keep)
    return final


def _seal(tmp: Path, final: Path, root: Path, step: int, state: dict[str, Any]) -> None:
    """Write the trainer state and the checksum index last, then rename: the checkpoint exists or it does not."""
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync(f)
        files[f.name] = sha256_file(f)
    index = tmp / INDEX
    index.write_text(json.dumps({"step": step, "files": files}, indent=2))
    _fsync(index)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)


def latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint whose files match their checksums; incomplete or corrupt ones are skipped."""
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    for step, d in sorted(found, reverse=True):
        problem = _verify(d)
        if problem:
            log.warning("skipping checkpoint %s: %s", d, problem)
            continue
        return Checkpoint(d, step, json.loads((d / "trainer_state.json").read_text()))
    return None


def restore(ckpt: Checkpoint, model: torch.nn.Module, optimizer: Any, scheduler: Any,
            procs: Processes | None = None) -> None:
    """Load trainable weights, optimizer, scheduler and RNG states from a verified checkpoint."""
    if procs is not None and procs.distributed:
        _load_sharded(ckpt.path, model, optimizer)
        states = torch.load(ckpt.path / f"states-{procs.rank}.pt", weights_only=True, map_location="cpu")
        scheduler.load_state_dict(states["scheduler"])
        _set_rng_state(states["rng"])
        return
    weights = load_file(str(ckpt.path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RunError(f"{ckpt.path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]})",
                       hint="the model or method changed since this checkpoint; start a new run folder")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    states = torch.load(ckpt.path / "states.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    _set_rng_state(states["rng"])


def _save_sharded(folder: Path, model: Any, optimizer: Any, procs: Processes) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def _load_sharded(folder: Path, model: Any, optimizer: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    # frozen base weights are not in a checkpoint (they come from the base model): load non-strictly
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _verify(d: Path) -> str | None:
    index = d / INDEX
    if not index.is_file():
        return "no checkpoint.json (incomplete write)"
    try:
        files = json.loads(index.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable checkpoint.json"
    for name, digest in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its checksum"
    return None


def _prune(root: Path, keep: int | None) -> None:
    if not keep:
        return
    steps = sorted((int(d.name[5:]), d) for d in root.iterdir() if d.name.startswith("step-") and d.name[5:].isdigit())
    for _, d in steps[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple:
    # plain Python values, so torch.load(weights_only=True) can read them back
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))


def _as_python_state(s: Any) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
