"""Merge a LoRA / QLoRA adapter into its base model and prove the merged model computes what the adapter did.

The base loads in the dtype its weights are stored in (``dtype`` of its config.json: bf16 for most hub
checkpoints, fp32 for SmolLM2 as tunesmith imports it) on the CPU, unless ``dtype`` asks for another; a QLoRA
adapter goes into that full-precision base too, never into 4-bit weights (rounding the merged weights to NF4 would
change the model that was evaluated); so does an adapter trained on an FP8 base (``train.base_precision: fp8``),
with a warning that measures how far the merged model is from the FP8 base it was trained against. A merge into
another 16-bit dtype (bf16 of an fp32 base) rounds what was trained: it is measured against base + adapter in the
base's own dtype and reported as a warning with its numbers.

Parity: the logits of the merged folder, reloaded by plain transformers, against the logits of base + adapter
(unmerged, PEFT) on sample conversations. Both sides run in the saved dtype, so the measured difference is what a
user of the merged folder sees. Exceeding the tolerance is an error, and the merged folder is
not put in place.

Why a tolerance per dtype, relative to the largest |logit|: in bf16 (8 mantissa bits, relative step
2^-8 ≈ 0.4 %) W + BA is rounded once when merged, while the unmerged model adds BA·x to a separately rounded W·x,
and every layer's bf16 arithmetic rounds again; a 2-layer model measured ~1 % of its largest logit, deeper models
add up more. In float32 both paths agree to ~1e-6 relative. A real merging bug (adapter missing, scaling wrong)
moves logits by the adapter's whole effect, which the result reports beside the difference.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import QuantSection
from ..errors import RunError, UserError
from ..files import replace_folder, writing
from ..paths import output_folder
from ..records import ExportRecord, TrainRun, versions
from .samples import conversations_for

DTYPES = ("bfloat16", "float16", "float32")

DEFAULT_RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.05, "float16": 0.01}
"""Largest allowed |logit difference| between merged and base + adapter, as a fraction of the largest |logit|
(floor 1.0), per saved dtype. bf16: 5 %, ~5x what the 2-layer test model measures (see module docstring)."""


@dataclass(frozen=True)
class Parity:
    """Merged model vs base + adapter on ``num_prompts`` conversations (``num_tokens`` positions in all)."""

    max_abs_diff: float
    tolerance: float
    """Absolute bound on ``max_abs_diff``: ``relative_tolerance`` × max(1, largest |logit| of base + adapter)."""
    relative_tolerance: float
    adapter_effect: float
    """Largest |logit change| the adapter makes over the bare base: what the merge had to preserve. When it is
    not well above ``tolerance`` the parity check cannot tell a merged adapter from a missing one."""
    top1_agreement: float
    """Fraction of positions where merged and base + adapter pick the same next token."""
    num_prompts: int
    num_tokens: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    @property
    def conclusive(self) -> bool:
        """The adapter changes logits by more than the tolerance, so a lost adapter would fail the check."""
        return self.adapter_effect > self.tolerance


@dataclass(frozen=True)
class MergeResult:
    out_dir: str
    base: str
    adapter: str
    method: str
    """``lora`` or ``qlora``, as the run's record says (``lora`` without one); a QLoRA adapter is merged into the
    full-precision base."""
    dtype: str
    parity: Parity
    base_dtype: str = ""
    """The dtype the base's weights are stored in; ``dtype`` follows it unless the user chose another."""
    precision_loss: dict[str, float] | None = None
    """Only when ``dtype`` loses what ``base_dtype`` holds: the merged model against base + adapter in the base's
    dtype — ``max_abs_diff`` and ``top1_agreement``: what the rounded weights change in what was trained."""
    quantized_base_drift: dict[str, float] | None = None
    """QLoRA only: merged model vs the 4-bit base + adapter that training (and any eval on it) used —
    ``max_abs_diff`` and ``top1_agreement``. Information, not a check: the full-precision merge removes the NF4
    rounding of the base weights, so this is the quantization error the adapter was trained around."""
    fp8_base_drift: dict[str, float] | None = None
    """FP8-base LoRA only: merged model vs the adapter on the FP8 base it was trained on (the same FP8 rounding of
    the base's block weights, computed on the CPU) — ``max_abs_diff`` and ``top1_agreement``; also a warning."""
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parity"]["passed"] = self.parity.passed
        out["parity"]["conclusive"] = self.parity.conclusive
        return out

    def summary(self) -> str:
        p = self.parity
        return (f"merged {self.method} adapter into {self.base} ({self.dtype}) → {self.out_dir}; parity max |Δlogit| "
                f"{p.max_abs_diff:.2e} ≤ {p.tolerance:.2e} (adapter effect {p.adapter_effect:.2e}, top-1 agreement "
                f"{p.top1_agreement:.1%} over {p.num_tokens} tokens)")


def merge(run_dir: str | Path | None, out_dir: str | Path, *, base: str | None = None,
          adapter: str | Path | None = None, dtype: str | None = None, tolerance: float | None = None,
          conversations: list[list[dict[str, Any]]] | None = None) -> MergeResult:
    """Merge the adapter of ``run_dir`` (or ``adapter`` on ``base``) into ``out_dir`` and check parity.

    ``dtype``: of the merged weights; None keeps the base's stored dtype. ``tolerance`` is relative to the largest
    |logit| (default per dtype: ``DEFAULT_RELATIVE_TOLERANCE``).
    """
    import torch

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}",
                        hint="or leave it out to keep the base model's own dtype")
    run_path = Path(run_dir) if run_dir is not None else None
    run = _train_run(run_path)
    adapter_dir, base_name = resolve_inputs(run_path, run, base, adapter)
    method = run.method if run is not None else "lora"
    settings = _model_settings(run)
    base_dtype = stored_dtype(base_name, settings)
    dtype = dtype or base_dtype
    torch_dtype = getattr(torch, dtype)
    relative = DEFAULT_RELATIVE_TOLERANCE[dtype] if tolerance is None else tolerance
    out = output_folder(out_dir)  # checked, not created: the merged model is renamed into place once it passes
    conversations = conversations or conversations_for(run)

    tokenizer = _load_tokenizer(adapter_dir, base_name, settings)
    model = _load_base(base_name, torch_dtype, settings)
    check_adapter_fits(adapter_dir, model, base_name)
    peft_model = _attach(model, adapter_dir, base_name)
    batches = [_conversation_ids(tokenizer, c) for c in conversations]
    with torch.no_grad():
        reference = [_logits(peft_model, ids) for ids in batches]
        with peft_model.disable_adapter():
            bare = [_logits(peft_model, ids) for ids in batches]

    staging = out.with_name(out.name + ".incomplete")
    if staging.exists():
        shutil.rmtree(staging)
    merged = peft_model.merge_and_unload()
    merged.generation_config = _generation_config(base_name, merged, tokenizer)
    needed = sum(p.numel() * p.element_size() for p in merged.parameters())
    with writing(staging, needed, what="the merged model", target=out):
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    del merged, peft_model, model

    reloaded = _load_base(str(staging), torch_dtype, {})
    with torch.no_grad():
        got = [_logits(reloaded, ids) for ids in batches]
    parity = _compare(got, reference, bare, relative)
    loss = None
    warnings = list(_base_mismatch(adapter_dir, base_name))
    if _lossy(dtype, base_dtype):
        loss = _precision_loss(base_name, settings, adapter_dir, batches, got, getattr(torch, base_dtype))
        warnings.append(f"merged in {dtype}, not in the base's own {base_dtype}: against base + adapter in "
                        f"{base_dtype}, max |Δlogit| {loss['max_abs_diff']:.3g} and top-1 agreement "
                        f"{loss['top1_agreement']:.1%} over {parity.num_tokens} tokens — merge without --dtype to "
                        f"keep {base_dtype}")
    drift = None
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is not None:
        drift = _quantized_base_drift(base_name, settings, adapter_dir, batches, got, torch_dtype, run.quantization)
    fp8_drift = None
    if run is not None and run.fp8_base:
        fp8_drift = _fp8_base_drift(base_name, settings, adapter_dir, batches, got, torch_dtype)
        warnings.append(f"trained on an FP8 base: the merged model is the adapter on the {dtype} base, not on the "
                        f"FP8-rounded base it was trained (and evaluated during training) against — max |Δlogit| "
                        f"{fp8_drift['max_abs_diff']:.3g}, top-1 agreement {fp8_drift['top1_agreement']:.1%} over "
                        f"{parity.num_tokens} tokens; evaluate the merged model before you ship it")
    result = MergeResult(out_dir=str(out), base=base_name, adapter=str(adapter_dir.resolve()), method=method,
                         dtype=dtype,
                         parity=parity, base_dtype=base_dtype, precision_loss=loss, quantized_base_drift=drift,
                         fp8_base_drift=fp8_drift, warnings=tuple(warnings))
    with writing(staging, what="the merged model", target=out):
        ExportRecord(stage="merge", kind="merged", source=result.adapter,
                     train_run=str(run_path.resolve()) if run is not None else None,
                     result=result.to_dict(), versions=versions()).write(staging)
    if not parity.passed:
        raise RunError(f"merged model differs from base + adapter: max |Δlogit| {parity.max_abs_diff:.3g} > tolerance "
                       f"{parity.tolerance:.3g}; the merged folder was left at {staging} for inspection (not at {out})",
                       hint="re-run with --dtype float32 to rule out rounding; if it still fails, report a bug")
    replace_folder(staging, out)
    return result


def _train_run(run_dir: Path | None) -> TrainRun | None:
    """The record of a run folder; None without a folder, or for a bare adapter folder (no run.json)."""
    if run_dir is None:
        return None
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, not a run folder", hint="pass the folder `tunesmith train` wrote")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found", hint="pass the folder `tunesmith train` wrote")
    return TrainRun.read(run_dir) if (run_dir / TrainRun.FILE).is_file() else None


def resolve_inputs(run_dir: Path | None, run: TrainRun | None, base: str | None,
                   adapter: str | Path | None) -> tuple[Path, str]:
    """(adapter folder, base model) from a run folder (and its record) and/or explicit paths; one clear error
    otherwise."""
    full = run.method == "full" if run is not None else \
        run_dir is not None and (run_dir / "model" / "config.json").is_file()
    if adapter is not None:
        adapter_dir = Path(adapter)
        if not adapter_dir.is_dir():
            problem = "is a file, not a PEFT adapter folder" if adapter_dir.exists() else "not found"
            raise UserError(f"--adapter {adapter_dir}: {problem}",
                            hint="the adapter/ folder of a LoRA run, holding adapter_config.json")
    elif run is not None and not full:
        adapter_dir = run.artefact(run_dir)
    elif run_dir is not None:
        # no record: a bare adapter folder, or a folder holding one in adapter/
        adapter_dir = run_dir if (run_dir / "adapter_config.json").is_file() else run_dir / "adapter"
    else:
        raise UserError("nothing to merge: give a run folder, or --base and --adapter")
    if not (adapter_dir / "adapter_config.json").is_file():
        if full:
            raise UserError(f"{run_dir}: this run fine-tuned the full model (model/), there is no adapter to merge",
                            hint=f"export it directly: tunesmith export {run_dir / 'model'} --format gguf")
        raise UserError(f"{adapter_dir}: no adapter_config.json — not a PEFT adapter folder",
                        hint="pass a run folder written by `tunesmith train` with method lora/qlora, or --adapter DIR")
    recorded = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    base_name = base or (run.base_model().name_or_path if run is not None else recorded)
    if not base_name:
        raise UserError(f"{adapter_dir}: the adapter does not record its base model",
                        hint="pass the base model with --base")
    return adapter_dir, str(base_name)


def check_adapter_fits(adapter_dir: Path, model: Any, base_name: str) -> None:
    """Every LoRA matrix must match the shape of the base module it adapts; else name the first that does not."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors",
                        hint="adapters are loaded from safetensors only; re-save the adapter with safe_serialization")
    recorded = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    hint = f"the adapter was trained on {recorded}; pass that model with --base" if recorded else \
        "pass the base model the adapter was trained on with --base"
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 — safe_open is not a mapping
            kind = "A" if ".lora_A." in key else "B" if ".lora_B." in key else None
            if kind is None:
                continue
            module_name = key.split(f".lora_{kind}.")[0].removeprefix("base_model.model.")
            shape = tuple(f.get_slice(key).get_shape())
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise UserError(f"{adapter_dir}: adapter for a different base model — {module_name} does not exist "
                                f"in {base_name}", hint=hint) from None
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2:
                continue
            out_features, in_features = weight.shape
            expected = in_features if kind == "A" else out_features
            actual = shape[1] if kind == "A" else shape[0]
            if actual != expected:
                raise UserError(f"{adapter_dir}: adapter for a different base model — {key} has shape "
                                f"{list(shape)}, but {module_name} in {base_name} has weight shape "
                                f"{list(weight.shape)}", hint=hint)


def _base_mismatch(adapter_dir: Path, base_name: str) -> tuple[str, ...]:
    """Same shapes but another recorded base (a base vs its instruct sibling): legal, often a mistake — say so."""
    recorded = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if not recorded or recorded == base_name:
        return ()
    same_folder = Path(recorded).exists() and Path(base_name).exists() and \
        Path(recorded).resolve() == Path(base_name).resolve()
    if same_folder:
        return ()
    return (f"the adapter records base model {recorded}, but was merged into {base_name}: shapes fit, so make sure "
            "this is the same model (a moved folder), not a sibling (base vs instruct)",)


def stored_dtype(base_name: str, settings: dict[str, Any]) -> str:
    """The dtype the base's weights are stored in (its config's ``dtype``); float32 when it records none or one
    tunesmith does not merge into (what transformers itself loads then)."""
    from ..config import ModelConfig
    from ..models import load_model_config

    config = load_model_config(ModelConfig(**{**settings, "name_or_path": base_name}))
    recorded = config.dtype
    name = str(recorded).removeprefix("torch.") if recorded is not None else "float32"
    return name if name in DTYPES else "float32"


def _lossy(dtype: str, base_dtype: str) -> bool:
    """The merged weights lose what the base's dtype holds: any 16-bit target but the base's own (bf16 of an fp32 or
    fp16 base loses mantissa; fp16 of a bf16 base loses range)."""
    return dtype != base_dtype and dtype != "float32"


def _precision_loss(base_name: str, settings: dict[str, Any], adapter_dir: Path, batches: list[list[int]],
                    merged: list[Any], base_torch_dtype: Any) -> dict[str, float]:
    """The merged model's logits against base + adapter in the base's own dtype."""
    return _merged_against(_load_base(base_name, base_torch_dtype, settings), adapter_dir, base_name, batches, merged)


def _merged_against(base: Any, adapter_dir: Path, base_name: str, batches: list[list[int]],
                    merged: list[Any]) -> dict[str, float]:
    """The merged model's logits against ``base`` with the adapter attached (unmerged), on the same batches."""
    import torch

    peft_model = _attach(base, adapter_dir, base_name)
    with torch.no_grad():
        reference = [_logits(peft_model, ids) for ids in batches]
    return _difference(merged, reference)


def _difference(got: list[Any], reference: list[Any]) -> dict[str, float]:
    diff = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
    same = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference, strict=True))
    return {"max_abs_diff": diff, "top1_agreement": same / sum(r.shape[0] for r in reference)}


def _quantized_base_drift(base_name: str, settings: dict[str, Any], adapter_dir: Path, batches: list[list[int]],
                          merged: list[Any], torch_dtype: Any, quant: QuantSection) -> dict[str, float]:
    """Logits of the 4-bit base + adapter (as trained) vs the merged model's."""
    from transformers import BitsAndBytesConfig

    from ..config import ModelConfig
    from ..models import load_model

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                                bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=torch_dtype)
    model = load_model(ModelConfig(**{**settings, "name_or_path": base_name}), quantization=config, device_map="cpu")
    return _merged_against(model, adapter_dir, base_name, batches, merged)


def _fp8_base_drift(base_name: str, settings: dict[str, Any], adapter_dir: Path, batches: list[list[int]],
                    merged: list[Any], torch_dtype: Any) -> dict[str, float]:
    """Logits of the adapter on the FP8 base (as trained: the training run's own quantisation, its products
    emulated on the CPU) vs the merged model's."""
    import torch

    from ..train import quantize_frozen_base

    peft_model = _attach(_load_base(base_name, torch_dtype, settings), adapter_dir, base_name)
    quantize_frozen_base(peft_model)
    with torch.no_grad():
        reference = [_logits(peft_model, ids) for ids in batches]
    return _difference(merged, reference)


def _attach(model: Any, adapter_dir: Path, base_name: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{adapter_dir}: cannot apply the adapter to {base_name}: {first}",
                        hint="pass the base model the adapter was trained on with --base") from None


def _load_base(name: str, torch_dtype: Any, settings: dict[str, Any]) -> Any:
    from ..config import ModelConfig
    from ..models import load_model

    return load_model(ModelConfig(**{**settings, "name_or_path": name}), dtype=torch_dtype, device_map="cpu")


def _model_settings(run: TrainRun | None) -> dict[str, Any]:
    """The run's ``model:`` section minus the name and dtype (trust_remote_code, revision, allow_pickle,
    chat_template …), so the base loads as it did in training."""
    return run.model.model_dump(exclude={"name_or_path", "dtype"}) if run is not None else {}


def _load_tokenizer(adapter_dir: Path, base_name: str, settings: dict[str, Any]) -> Any:
    """The adapter's tokenizer when it saved one (it carries the training chat template), else the base's."""
    from ..config import ModelConfig
    from ..models import load_tokenizer

    cfg = ModelConfig(**{**settings, "name_or_path": base_name})
    if (adapter_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(cfg, path=str(adapter_dir))
    return load_tokenizer(cfg)


def _conversation_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of the whole conversation, tokenised exactly as in training."""
    from ..chat import tokenize_chat

    return tokenize_chat(tokenizer, messages).input_ids


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def _compare(got: list[Any], reference: list[Any], bare: list[Any], relative: float) -> Parity:
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    diff = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
    effect = max(float((r - b).abs().max()) for r, b in zip(reference, bare, strict=True))
    same = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference, strict=True))
    total = sum(r.shape[0] for r in reference)
    return Parity(max_abs_diff=diff, tolerance=relative * scale, relative_tolerance=relative, adapter_effect=effect,
                  top1_agreement=same / total, num_prompts=len(reference), num_tokens=total)


def _generation_config(base_name: str, model: Any, tokenizer: Any) -> Any:
    """The base's generation config, stopping at every end-of-turn token of the chat template."""
    from ..chat import end_of_turn_ids

    config = model.generation_config
    stops = end_of_turn_ids(tokenizer)
    existing = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = sorted({*stops, *(e for e in existing if e is not None)})
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
