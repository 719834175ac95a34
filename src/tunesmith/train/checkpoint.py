"""Resumable checkpoints, written atomically and verified on load.

A checkpoint is written into ``checkpoints/.tmp-<step>``, every file is fsynced and listed with its sha256 in
``checkpoint.json`` (written last), then the folder is renamed to ``checkpoints/step-<step>``. A crash mid-write
leaves only a ``.tmp-`` folder, which is ignored; a renamed checkpoint whose files no longer match their checksums
is skipped with a warning. Trainable weights are safetensors; optimizer/scheduler/RNG states are loaded with
``torch.load(weights_only=True)`` (no arbitrary unpickling).

Each checkpoint's ``trainer_state.json`` also keeps what its run's fingerprint was computed from (the train settings
that change the optimisation, the model and the data files' hashes), so a resume that is refused because they differ
names what changed. Checkpoints written before that record still resume, with the shorter message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import RunError, UserError
from ..files import remove, replace_folder, writing
from ..records import sha256_file
from .distributed import Processes, barrier

log = logging.getLogger(__name__)

INDEX = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


@dataclass(frozen=True)
class Fingerprint:
    """What a run's optimisation depends on: a resume continues only where these are unchanged."""

    config: dict[str, Any]
    """The train settings that change the optimisation (as in the config: ``learning_rate``, ``lora.r``, …)."""
    model: str
    files: tuple[tuple[str, str], ...]
    """(path, sha256) of each data file read (train, then eval)."""

    @property
    def digest(self) -> str:
        # the same bytes as before the inputs were kept, so older checkpoints of an unchanged run still match
        digest = hashlib.sha256(json.dumps([self.config, self.model], sort_keys=True).encode())
        for _, sha in self.files:
            digest.update(sha.encode())
        return digest.hexdigest()[:16]

    def to_state(self) -> dict[str, Any]:
        """The checkpoint's record of this fingerprint: the digest and what it was computed from."""
        return {"fingerprint": self.digest, "fingerprint_inputs": {
            "config": self.config, "model": self.model, "files": [{"path": p, "sha256": h} for p, h in self.files]}}


def fingerprint(config: dict[str, Any], model: str, files: list[Path | None]) -> Fingerprint:
    return Fingerprint(config, model, tuple((str(f), sha256_file(f)) for f in files if f is not None))


def changes(state: dict[str, Any], now: Fingerprint) -> list[str]:
    """What differs between the fingerprint a checkpoint recorded and ``now``, as the config spells it:
    ``train.learning_rate (0.001 → 0.0002)``, ``data file train.jsonl``. Empty for a checkpoint from before the
    inputs were recorded (nothing to compare with)."""
    recorded = state.get("fingerprint_inputs")
    if not isinstance(recorded, dict):
        return []
    old, new = flatten(recorded.get("config", {}), "train."), flatten(now.config, "train.")
    out = [f"{key} ({_shown(old.get(key))} → {_shown(new.get(key))})" for key in sorted(old.keys() | new.keys())
           if old.get(key, _ABSENT) != new.get(key, _ABSENT)]
    if recorded.get("model") != now.model:
        out.append(f"model.name_or_path ({_shown(recorded.get('model'))} → {_shown(now.model)})")
    old_files = [(f["path"], f["sha256"]) for f in recorded.get("files", [])]
    if len(old_files) != len(now.files):
        out.append(f"data files ({len(old_files)} → {len(now.files)})")
    else:
        out += [f"data file {Path(path).name}" for (path, sha), (_, old_sha) in zip(now.files, old_files, strict=True)
                if sha != old_sha]
    return out


_ABSENT = object()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (``{"lora": {"r": 16}}`` → ``{"lora.r": 16}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(value: Any) -> str:
    return "unset" if value is None else value if isinstance(value, str) else json.dumps(value)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(root: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any],
         keep: int | None, procs: Processes | None = None, best: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically; prune to the newest ``keep``, never the ``best`` step's (the run's
    best evaluation, kept on top of them). Disk-full is a RunError.

    One process: trainable weights as safetensors + optimizer/scheduler/RNG states. Several (FSDP2): every process
    writes its shards with torch.distributed.checkpoint, then the main process seals and renames the folder."""
    procs = procs or Processes(0, 1, 0, torch.device("cpu"))
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step}"
    final = root / f"step-{step}"
    previous = latest_step(root)
    kept = f"checkpoint {previous} is intact" if previous is not None else "no earlier checkpoint"
    try:
        with writing(tmp, _bytes(model, optimizer), what=f"checkpoint {step}", target=final,
                     hint="free disk space or lower train.save_total_limit, then continue with --resume"):
            if procs.main:
                remove(tmp)
                tmp.mkdir()
            barrier(procs)
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
    except RunError as exc:
        raise RunError(f"{exc.message}; {kept}", hint=exc.hint) from exc.__cause__
    except OSError as exc:  # not a refusal of the storage: still one message, and the partial folder is gone
        raise RunError(f"could not write checkpoint {step} in {root}: {exc}; {kept}") from exc
    if procs.main:
        _prune(root, keep, best)
    return final


def _bytes(model: torch.nn.Module, optimizer: Any) -> int:
    """What a checkpoint holds: the trainable weights and the optimizer's tensors (AdamW: two per weight)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    return weights + states


def latest_step(root: Path) -> int | None:
    """The step of the newest complete-looking checkpoint folder in ``root`` (not verified: for messages)."""
    steps = [int(d.name[5:]) for d in root.iterdir() if d.name.startswith("step-") and d.name[5:].isdigit()
             and (d / INDEX).is_file()]
    return max(steps, default=None)


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
    replace_folder(tmp, final)


def chosen(root: Path, wanted: bool | str | Path) -> Checkpoint | None:
    """The checkpoint a resume continues from: the newest complete one (``wanted=True``), or the folder named, which
    must be a complete checkpoint in ``root`` (this run's ``checkpoints/``)."""
    if wanted is True:
        return latest(root)
    path = Path(wanted)
    if not path.exists():
        raise UserError(f"--from-checkpoint {path}: no such checkpoint (nothing at that path)",
                        hint=f"see `ls {root}`, or use --resume for the newest complete one")
    if path.resolve().parent != root.resolve():
        other_run = path.parent.name == "checkpoints"
        raise UserError(f"--from-checkpoint {path}: not a checkpoint of this run (its checkpoints are in {root})",
                        hint=f"pass --out {path.parent.parent} to continue the run it belongs to" if other_run
                        else f"pass a step-<N> folder of {root}")
    if not (path.is_dir() and path.name.startswith("step-") and path.name[5:].isdigit()):
        raise UserError(f"--from-checkpoint {path}: no such checkpoint (a folder step-<N> in {root})",
                        hint="see `ls " + str(root) + "`, or use --resume for the newest complete one")
    problem = _verify(path)
    if problem:
        raise UserError(f"--from-checkpoint {path}: not a complete checkpoint ({problem})",
                        hint="choose an older one, or use --resume for the newest complete one")
    return Checkpoint(path, int(path.name[5:]), json.loads((path / "trainer_state.json").read_text()))


def newest_sealed(root: Path) -> Path | None:
    """The newest checkpoint folder whose index was written (it is written last), found without reading its files:
    for a signal handler's message, which must be quick. A resume still verifies it (``latest``)."""
    sealed = [(int(d.name[5:]), d) for d in root.glob("step-*") if d.name[5:].isdigit() and (d / INDEX).is_file()]
    return max(sealed)[1] if sealed else None


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
        states = _load_states(ckpt, f"states-{procs.rank}.pt", ("scheduler", "rng"))
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
    states = _load_states(ckpt, "states.pt", ("optimizer", "scheduler", "rng"))
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    _set_rng_state(states["rng"])


def _load_states(ckpt: Checkpoint, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint's optimizer/scheduler/RNG states, unpickled only as plain tensors and containers: a file
    whose unpickling would run code (a planted pickle, with its checksum updated to match) is refused unread."""
    where = f"checkpoint {ckpt.path.name} ({ckpt.path})"
    hint = "delete this checkpoint, or resume from an earlier one with --from-checkpoint"
    try:
        states = torch.load(ckpt.path / name, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UserError(f"{where}: {name} is not a plain tensor file (refused to unpickle)", hint=hint) from None
    except (RuntimeError, EOFError, ValueError) as exc:  # not a torch file: a truncated or foreign zip
        raise UserError(f"{where}: {name} cannot be read ({str(exc).splitlines()[0]})", hint=hint) from None
    if not isinstance(states, dict) or any(key not in states for key in keys):
        raise UserError(f"{where}: {name} does not hold the {', '.join(keys)} states tunesmith writes", hint=hint)
    return states


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


def _prune(root: Path, keep: int | None, best: int | None = None) -> None:
    if not keep:
        return
    steps = sorted((int(d.name[5:]), d) for d in root.iterdir() if d.name.startswith("step-") and d.name[5:].isdigit()
                   and int(d.name[5:]) != best)
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
