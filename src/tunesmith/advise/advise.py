"""``advise()``: should this team fine-tune, how, on what, for how long and at what price — before any GPU is rented.

Reads top to bottom: resolve the model's architecture → count the data → decide (the guide's framework) → pick the
model → memory per method and the method that fits → time and cost → serving bill → starter config → Advice.
Everything comes from the architecture config (meta device); no weights are downloaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import write_text_atomic
from ..hardware import catalog
from ..hardware.machine import Hardware
from ..hardware.memory import (
    Architecture,
    MemoryEstimate,
    architecture_from_config,
    estimate_memory,
    largest_micro_batch,
)
from ..paths import output_file
from .cost import (
    API_PRICES_PER_MTOK,
    OPENAI_TRAINING_PER_MTOK,
    ServingComparison,
    TrainingEstimate,
    compare_serving,
    estimate_training,
    padding_efficiency,
)
from .dataset_stats import DatasetStats, count_dataset
from .decide import Decision, choose_method, decide

GUIDE_EFFECTIVE_BATCH = 16
"""The guide's 4 × 4 = 16 sequences per optimizer step; kept when the micro-batch has to shrink."""

CPU_SERVE = ("llama.cpp / Ollama: merge (`tunesmith merge`), export a GGUF (`tunesmith export --format gguf`, "
             "q8_0 or q4_k_m) and serve it (`tunesmith serve` or `ollama create -f model-q8_0.Modelfile`)")
"""How a model trained on a CPU is served: vLLM needs a GPU."""

SERVING_GPUS = ("a10g", "h100-80gb")
"""The guide's self-hosting choices ("self-host on A10G or H100"): the cheaper of the two is reported."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    """Catalogue name, folder or file the user gave."""
    name_or_path: str
    """What a tunesmith config's ``model.name_or_path`` should say (hub id of the chat checkpoint, or the folder)."""
    config: Any
    tokenizer: Any = None


@dataclass(frozen=True)
class Advice:
    decision: Decision
    method: str | None
    """The method after the memory check (may be lighter than the rule's first choice)."""
    model: str | None
    gpu: str
    num_gpus: int
    architecture: Architecture | None
    dataset: DatasetStats | None
    memory: dict[str, MemoryEstimate] = field(default_factory=dict)
    """Per method, at the recommended micro-batch (or 1 where that does not fit)."""
    max_micro_batch: dict[str, int] = field(default_factory=dict)
    """Per method: the largest micro-batch that fits (0: not even one), rows of min(max_length, longest example)."""
    training: TrainingEstimate | None = None
    serving: ServingComparison | None = None
    openai_training_usd: float | None = None
    """For the OpenAI route: tokens × epochs × the gpt-4o-mini training price (an editable assumption)."""
    config_yaml: str | None = None
    config_path: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.dataset is not None:
            out["dataset"] = self.dataset.to_dict()
        return out

    def summary(self) -> str:
        if self.decision.verdict == "not_yet":
            return "don't fine-tune yet — " + self.decision.instead[0]
        if self.decision.verdict == "openai_fine_tuning":
            return "use the OpenAI fine-tuning API (gpt-4o-mini)"
        return f"{self.method} on {self.model} ({self.num_gpus}× {self.gpu})"


def advise(data: str | Path | None = None, model: str | None = None, gpu: str | None = None, num_gpus: int = 1, *,
           calls_per_day: int | None = None, drivers: tuple[str, ...] | list[str] = (), domain_shift: bool = False,
           epochs: float = 3.0, max_length: int = 2048, micro_batch_size: int = 4, lora_r: int = 16,
           price_per_hour: float | None = None, api_model: str = "gpt-4o",
           api_prices: tuple[float, float] | None = None, write_config: str | Path | None = None) -> Advice:
    """The advisor. ``model``: a catalogue name, a hub id, a model folder or a config.json; ``gpu``: a catalogue
    name (detected when None, else an A100 80GB is assumed and said so)."""
    notes: list[str] = []
    if write_config is not None:  # a bad path fails before any work, whatever the advice
        output_file(write_config, "--write-config")
    _check_api_model(api_model, api_prices)
    resolved = resolve_model(model) if model else None
    named_gpu = catalog.lookup_gpu(gpu) if gpu else None  # an unknown name fails before any work
    stats = _count(data, resolved, notes)

    decision = decide(stats.examples if stats else None, drivers, domain_shift=domain_shift,
                      calls_per_day=calls_per_day)
    if decision.verdict != "fine_tune":
        return _advice_without_training(decision, stats, named_gpu, num_gpus, epochs, write_config, notes)

    gpu_spec = _with_price(named_gpu or _default_gpu(notes), price_per_hour)
    if resolved is None:
        resolved = resolve_model(decision.default_model or catalog.model_names()[0])
        notes.append(f"No --model: using {resolved.name} ({decision.model_size}, the guide's size for this case).")
    arch = architecture_from_config(resolved.config, resolved.name)
    notes += _size_notes(decision, arch)
    targets = _lora_targets(arch)
    lora_params, adapted_in = _lora_counts(resolved.config, lora_r, targets)

    length = _fitted_length(stats, max_length, notes)
    memory, max_mb, needs = _memory_per_method(arch, resolved.config, length, micro_batch_size, gpu_spec, num_gpus,
                                               lora_r, lora_params, adapted_in, notes)
    method, fit_notes = choose_method(decision.method or "lora", {m: max_mb[m] > 0 for m in max_mb}, needs,
                                      gpu_spec.memory_gib)
    notes += fit_notes
    if method is None:
        raise UserError(f"{arch.name} does not fit on {num_gpus}× {gpu_spec.name} with any method "
                        f"(QLoRA needs ~{needs['qlora']:.1f} GiB at micro-batch 1 × {length} tokens)",
                        hint="choose a smaller --model, a bigger --gpu, more --gpus (full fine-tuning and LoRA "
                             "shard), or a shorter --max-length")
    if method == "qlora" and num_gpus > 1:
        notes.append("QLoRA trains on one GPU (bitsandbytes 4-bit weights are not FSDP-shardable): time and cost "
                     "are for one GPU; use LoRA to spread over several.")
        num_gpus = 1
    micro = min(micro_batch_size, max_mb[method])
    accumulation = max(1, math.ceil(GUIDE_EFFECTIVE_BATCH / (micro * num_gpus)))

    training = _training(arch, method, stats, length, micro, epochs, gpu_spec, num_gpus, lora_params)
    if gpu_spec.cpu:
        notes += _cpu_notes(decision, arch, training)
        decision = replace(decision, serve=CPU_SERVE)
    serving = _serving(arch, calls_per_day, stats, api_model, api_prices) if calls_per_day else None
    if serving is None and decision.rule == "cost":
        notes.append("Give --calls-per-day to compute the serving bill against an API model.")

    yaml_text = starter_config(resolved.name_or_path, method, targets, lora_r, micro, accumulation, epochs,
                               length, str(data) if data else None, decision, arch.name)
    if write_config is not None:
        _write(Path(write_config), yaml_text)
    return Advice(decision=decision, method=method, model=arch.name, gpu=gpu_spec.name, num_gpus=num_gpus,
                  architecture=arch, dataset=stats, memory=memory, max_micro_batch=max_mb, training=training,
                  serving=serving, config_yaml=yaml_text, config_path=str(write_config) if write_config else None,
                  notes=tuple(notes))


def _check_api_model(api_model: str, api_prices: tuple[float, float] | None) -> None:
    if api_prices is None and api_model not in API_PRICES_PER_MTOK:
        raise UserError(f"--api-model {api_model!r}: no built-in price"
                        + catalog.did_you_mean(api_model, list(API_PRICES_PER_MTOK)),
                        hint="pass its prices with --api-price IN,OUT ($ per million tokens)")


def _advice_without_training(decision: Decision, stats: DatasetStats | None, gpu: catalog.Gpu | None, num_gpus: int,
                             epochs: float, write_config: str | Path | None, notes: list[str]) -> Advice:
    """Not yet, or the OpenAI route: no memory or GPU time to estimate; the OpenAI route's training is priced."""
    openai_usd = None
    if stats is None:
        notes.append("No --data: the example-count question was skipped.")
    elif decision.verdict == "openai_fine_tuning":
        price = OPENAI_TRAINING_PER_MTOK["gpt-4o-mini"]
        openai_usd = round(stats.total_tokens * epochs * price / 1e6, 2)
        notes.append(f"OpenAI fine-tuning: {stats.total_tokens:,} tokens × {epochs:g} epochs at ${price}/M "
                     f"training tokens ≈ ${openai_usd:,.2f} (list price; check the current one).")
    if write_config is not None:
        notes.append(f"No config written to {write_config}: the advice is not to train with tunesmith now.")
    return Advice(decision=decision, method=None, model=None, gpu=gpu.name if gpu else "", num_gpus=num_gpus,
                  architecture=None, dataset=stats, openai_training_usd=openai_usd, notes=tuple(notes))


def _with_price(gpu: catalog.Gpu, price_per_hour: float | None) -> catalog.Gpu:
    if price_per_hour is None:
        return gpu
    return catalog.Gpu(gpu.name, gpu.memory_gb, gpu.memory_gib, gpu.bf16_tflops, price_per_hour)


def _fitted_length(stats: DatasetStats | None, max_length: int, notes: list[str]) -> int:
    """max_length for the config and the memory model: the longest example rounded up to 128, capped by the
    user's max_length. With packing (tunesmith's default on GPUs) every micro-batch row is filled to it."""
    if stats is None:
        notes.append("No --data: memory is estimated for rows of max_length and time/cost need a dataset.")
        return max_length
    fitted = min(max_length, math.ceil(stats.max_tokens / 128) * 128)
    if stats.over(max_length):
        notes.append(f"{stats.over(max_length):,} examples are longer than max_length {max_length} "
                     "(training drops them by default: train.overlong).")
    return fitted


def _memory_per_method(arch: Architecture, config: Any, length: int, micro_batch_size: int, gpu: catalog.Gpu,
                       num_gpus: int, lora_r: int, lora_params: int, adapted_in: int, notes: list[str]
                       ) -> tuple[dict[str, MemoryEstimate], dict[str, int], dict[str, float]]:
    """Per method: the estimate at the micro-batch that will be used, the largest that fits, and what one row needs.
    Full fine-tuning is estimated with the optimizer ``tunesmith train`` plans for it on this GPU
    (src/tunesmith/train/plan.py): where fp32 AdamW does not fit one GPU, bf16 weights rounded stochastically with
    8-bit AdamW states."""
    from ..train.plan import OPTIMIZER_MEMORY

    memory, max_mb, needs = {}, {}, {}
    for method in ("full", "lora", "qlora"):
        kwargs = _memory_kwargs(method, lora_r, lora_params, adapted_in, num_gpus, arch.plain_output_head)
        optimizer = _full_fine_tuning_optimizer(config, length, gpu, num_gpus) if method == "full" else "adamw_torch"
        fp32 = estimate_memory(arch, method, 1, length, **kwargs).total_gib  # fp32 AdamW, as _memory_kwargs says
        states, weights = OPTIMIZER_MEMORY[optimizer]
        kwargs.update(optimizer=states, full_precision=weights)
        max_mb[method] = largest_micro_batch(arch, method, length, gpu.memory_gib, **kwargs)
        needs[method] = estimate_memory(arch, method, 1, length, **kwargs).total_gib
        if optimizer == "adamw_8bit_bf16":
            notes.append(f"Full fine-tuning on one {gpu.name}: fp32 master weights and AdamW states need "
                         f"~{fp32:.0f} GiB, so tunesmith trains bf16 weights rounded stochastically with 8-bit "
                         f"AdamW states (train.optim: auto → adamw_8bit_bf16, torchao from tunesmith[gpu]): "
                         f"~{needs[method]:.0f} GiB.")
        batch = min(micro_batch_size, max_mb[method]) or 1
        memory[method] = estimate_memory(arch, method, batch, length, **kwargs)
    return memory, max_mb, needs


def _full_fine_tuning_optimizer(config: Any, length: int, gpu: catalog.Gpu, num_gpus: int) -> str:
    """The optimizer ``tunesmith train`` plans for full fine-tuning at micro-batch 1 × ``length`` on ``num_gpus`` of
    ``gpu``: the same plan, on the catalogue's facts. Where the plan refuses (not even 8-bit states fit), fp32 AdamW:
    the estimate then says what full fine-tuning needs as configured by default."""
    from ..config import TrainConfig
    from ..train.plan import plan_training

    tcfg = TrainConfig(method="full", per_device_train_batch_size=1, max_length=length)
    try:
        return plan_training(config, tcfg, hardware=Hardware.from_catalog(gpu), world=num_gpus).optimizer
    except UserError:
        return "adamw_torch"


def _training(arch: Architecture, method: str, stats: DatasetStats | None, length: int, micro: int, epochs: float,
              gpu: catalog.Gpu, num_gpus: int, lora_params: int) -> TrainingEstimate | None:
    """Time and cost at the speed measured for the guide's recipe (the only calibration so far), padding included."""
    if stats is None:
        return None
    kept = [n for n in stats.lengths if n <= length]  # longer examples are dropped (train.overlong: drop)
    if gpu.cpu:
        return _cpu_training(arch, method, sum(kept), epochs, gpu)
    return estimate_training(arch, method, sum(kept), epochs, min(stats.mean_tokens, length),
                             peak_tflops=gpu.bf16_tflops, price_per_hour=gpu.price_per_hour, num_gpus=num_gpus,
                             lora_params=0 if method == "full" else lora_params,
                             pad_eff=padding_efficiency(kept, micro, length))


def _cpu_training(arch: Architecture, method: str, tokens: int, epochs: float, cpu: catalog.Gpu) -> TrainingEstimate:
    """The estimate `tunesmith train` prints before a CPU run (train/eta.py), so advise and train agree: the same
    FLOPs per token (with the CPU's checkpointing default: only QLoRA recomputes), the same calibration."""
    from ..config import TrainConfig
    from ..train import eta
    from ..train.plan import checkpointing_on

    recomputed = 1.0 if checkpointing_on(TrainConfig(method=method), Hardware.cpu()) else 0.0
    run = eta.estimate(round(tokens * epochs), arch.total_params, method, recomputed, "cpu", cpu.bf16_tflops * 1e12)
    rate = cpu.bf16_tflops * 1e12 * eta.EFFICIENCY["cpu"] / run.flops_per_token
    return TrainingEstimate(method=method, tokens=tokens, epochs=epochs, flops_per_token=run.flops_per_token,
                            mfu=eta.EFFICIENCY["cpu"], padding_efficiency=1.0, tokens_per_s=round(rate, 1),
                            hours=round(run.seconds / 3600, 3), gpu_hours=0.0, cost_usd=0.0,
                            calibration="this CPU's measured fp32 matmul rate × the share training sustains "
                                        "(train/eta.py)")


# -- model --------------------------------------------------------------------------------------------------------

def resolve_model(spec: str) -> ResolvedModel:
    """A catalogue name or hub id, a ``config.json`` file, a model folder or ``local:NAME``."""
    from transformers import AutoConfig

    entry = catalog.lookup_model(spec)
    if entry is not None:
        name = next(k for k, v in catalog.MODELS.items() if v is entry)
        fields = catalog.config_dict(entry)
        return ResolvedModel(name, catalog.INSTRUCT_IDS.get(name, entry["hub_id"]),
                             AutoConfig.for_model(fields.pop("model_type"), **fields))
    path = Path(spec).expanduser()
    if path.is_file():
        return ResolvedModel(spec, spec, _config_from_json(path))
    if path.is_dir() or spec.startswith("local:") or spec.count("/") == 1:
        from ..config import ModelConfig
        from ..models import load_model_config, load_tokenizer

        cfg = ModelConfig(name_or_path=spec)
        try:
            config = load_model_config(cfg)
        except UserError as exc:
            raise UserError(f"--model {spec}: {exc.message}" + catalog.did_you_mean(spec, catalog.model_names()),
                            hint=f"use a built-in architecture ({', '.join(catalog.model_names())}) or a local "
                                 "folder / config.json") from None
        try:
            tokenizer = load_tokenizer(cfg)
        except (UserError, OSError, ValueError):
            tokenizer = None  # a folder with config.json only: tokens are estimated from characters
        return ResolvedModel(spec, spec, config, tokenizer)
    raise UserError(f"--model {spec!r}: not in the model catalogue, not a file or folder"
                    + catalog.did_you_mean(spec, catalog.model_names()),
                    hint=f"built-in: {', '.join(catalog.model_names())}; or a config.json / model folder")


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--model {path}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"--model {path}: no model_type in the config", hint="give a Hugging Face config.json")
    if data.get("auto_map"):
        raise UserError(f"--model {path}: the architecture needs custom code (auto_map)",
                        hint="use a built-in architecture with the same shape")
    data = {k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "auto_map")}
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except ValueError as exc:
        raise UserError(f"--model {path}: {exc}") from None


def _lora_targets(arch: Architecture) -> list[str] | str:
    from ..config import GUIDE_TARGETS

    return list(GUIDE_TARGETS) if set(GUIDE_TARGETS) <= set(arch.linear_targets) else "all-linear"


def _lora_counts(config: Any, r: int, targets: list[str] | str) -> tuple[int, int]:
    from ..hardware.memory import lora_trainable_params

    return lora_trainable_params(config, r, targets)


def _size_notes(decision: Decision, arch: Architecture) -> list[str]:
    billions = arch.total_params / 1e9
    if decision.rule in ("latency", "cost") and billions > 15:
        return [f"{arch.name} has {parameter_count(arch.total_params)} parameters; the guide recommends "
                f"{decision.model_size} for {decision.rule} — a smaller model serves each token several times "
                "cheaper and faster."]
    if decision.rule == "quality" and billions < 60:
        return [f"{arch.name} has {parameter_count(arch.total_params)} parameters; the guide's answer for maximum "
                "quality is a 70B+ model (e.g. --model llama-3.1-70b or qwen2.5-72b)."]
    return []


def parameter_count(n: int) -> str:
    """135M, 1.7B, 70B: the size as people say it."""
    if n < 1e9:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e9:.1f}B" if n < 1e10 else f"{n / 1e9:.0f}B"


def _cpu_notes(decision: Decision, arch: Architecture, training: TrainingEstimate | None) -> list[str]:
    """On a CPU: serve with llama.cpp, not vLLM; and say when the run is long and what trains in reasonable time."""
    notes = ["On a CPU, serve a GGUF with llama.cpp or Ollama (`tunesmith export --format gguf`, then "
             "`tunesmith serve`): vLLM needs a GPU."]
    if training is not None and training.hours > 0.5:
        smaller = "" if arch.total_params < 2e8 else (" — local:smollm2-135m-instruct (135M, ships offline) "
                                                     "trains ~180 tokens/s on 2 cores")
        notes.append(f"{training.hours:.1f} h on this CPU for {arch.name} ({parameter_count(arch.total_params)}): "
                     f"train on fewer examples or epochs, or a smaller model{smaller}, or use a GPU.")
    return notes


# -- hardware and data ----------------------------------------------------------------------------------------------

def _default_gpu(notes: list[str]) -> catalog.Gpu:
    detected = _detect_gpu()
    if detected is not None:
        try:
            gpu = catalog.lookup_gpu(detected)
            notes.append(f"GPU detected: {detected}.")
            return gpu
        except UserError:
            notes.append(f"GPU detected ({detected}) is not in the catalogue.")
    cpu = catalog.this_cpu()
    notes.append(f"No GPU found: estimating for this machine's {cpu.name} ({cpu.bf16_tflops * 1e3:,.0f} GFLOP/s "
                 "fp32 matmul, measured); give --gpu NAME to plan for a GPU.")
    return cpu


def _detect_gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # detection is a convenience; any failure means "not detected"
        return None


def _count(data: str | Path | None, resolved: ResolvedModel | None, notes: list[str]) -> DatasetStats | None:
    if data is None:
        return None
    tokenizer = resolved.tokenizer if resolved else None
    if tokenizer is None:
        notes.append("Tokens estimated from characters (≈4 per token): give --model as a local folder with its "
                     "tokenizer for exact counts.")
    return count_dataset(data, tokenizer, resolved.name if resolved and tokenizer is not None else None)


def _memory_kwargs(method: str, r: int, lora_params: int, adapted_in: int, num_gpus: int,
                   plain_head: bool) -> dict[str, Any]:
    # tunesmith's engine: bf16 autocast, fp32 master weights for full fine-tuning, checkpointing on, and the
    # chunked loss — except where the output head is soft-capped or scaled (train/loss.py falls back to full logits).
    return {"lora_r": r, "lora_trainable": lora_params, "adapted_in_features": adapted_in,
            "checkpointing": "full", "logits": "chunked" if plain_head else "full", "full_precision": "mixed",
            "shards": 1 if method == "qlora" else num_gpus}


def _serving(arch: Architecture, calls_per_day: int, stats: DatasetStats | None, api_model: str,
             api_prices: tuple[float, float] | None) -> ServingComparison:
    prompt = stats.prompt_tokens_per_example if stats else 500.0
    completion = stats.completion_tokens_per_example if stats else 200.0
    options = [compare_serving(arch, calls_per_day, prompt, completion, gpu_name=g,
                               peak_tflops=catalog.GPUS[g].bf16_tflops, price_per_hour=catalog.GPUS[g].price_per_hour,
                               memory_gib=catalog.GPUS[g].memory_gib, api_model=api_model, api_prices=api_prices)
               for g in SERVING_GPUS]
    return min(options, key=lambda s: s.self_hosted_cost_per_day)


# -- starter config -------------------------------------------------------------------------------------------------

def starter_config(name_or_path: str, method: str, targets: list[str] | str, r: int, micro: int, accumulation: int,
                   epochs: float, max_length: int, dataset: str | None, decision: Decision, arch_name: str) -> str:
    """A tunesmith YAML for the recommendation, validated against the config models before it is returned."""
    import yaml

    from ..config import Config

    train: dict[str, Any] = {"method": method}
    if dataset:
        train["dataset"] = dataset
    if method != "full":
        train["lora"] = {"r": r, "alpha": 2 * r, "dropout": 0.05, "target_modules": targets}
        train["learning_rate"] = 2e-4
    else:
        train["learning_rate"] = 1e-5  # every weight moves: an order of magnitude below the adapters' 2e-4
    train.update({"num_train_epochs": epochs, "per_device_train_batch_size": micro,
                  "gradient_accumulation_steps": accumulation, "max_length": max_length})
    body = {"model": {"name_or_path": name_or_path}, "train": train}
    Config.model_validate(body)  # a bug here must never write a config `tunesmith train` rejects
    header = [f"# Written by `tunesmith advise`: {method} on {arch_name} ({decision.rule}).",
              *(f"# {line}" for line in _wrap(decision.reasons[0])),
              f"# Serve: {decision.serve.split(':')[0]}.",
              f"# {micro} × {accumulation} = {micro * accumulation} sequences per optimizer step per GPU "
              f"(the guide's 16; micro-batch {micro} is what fits).", ""]
    return "\n".join(header) + yaml.safe_dump(body, sort_keys=False)


def _wrap(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, 110)


def _write(path: Path, text: str) -> None:
    write_text_atomic(output_file(path, "--write-config"), text)
