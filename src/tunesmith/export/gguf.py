"""HF model folder → GGUF (llama.cpp / Ollama), through llama.cpp's own converter and quantizer, then proven by
llama.cpp itself: the GGUF is loaded with ``llama_cpp.Llama`` and its greedy output compared with the HF model's
on sample conversations (float types: identical tokens expected; quantized: the agreement is measured and reported).

Two steps, as llama.cpp documents them: ``convert_hf_to_gguf.py`` writes f32/f16/bf16 (its ``--outtype`` has no
K-quants, whatever older guides say), then ``llama_model_quantize`` (llama-cpp-python's binding of llama.cpp's
quantizer) makes q8_0 / q4_k_m / q5_k_m / … from that. K-quants work on blocks of 256 values: tensors whose rows
are not a multiple of 256 fall back to a legacy type (llama.cpp's choice); the result lists every tensor type
written, so a fallback is visible.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import processes
from ..errors import RunError, UserError
from ..files import disk_full, free_space, out_of_space
from ..paths import output_folder
from ..records import ExportRecord, TrainRun, versions
from .converter import find_converter, llama_cpp_version
from .ollama import match_template, system_fits_modelfile, write_modelfile
from .samples import conversations_for, prompt_part, trained_in

FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
"""Quantization types offered (llama.cpp's names, lower case). i-quants are left out: they need an importance matrix."""

QUANTS = (*FLOAT_TYPES, *QUANT_TYPES)

QUANT_AGREEMENT_WARNING = 0.9
"""A quantised GGUF whose greedy tokens agree with the HF model's on less than this fraction (mean matching prefix
per prompt) is reported with a warning. A sound q8_0 of a trained model agrees on nearly every token; 4-bit types
of small models drift more, and the warning tells the user to check the task metric before serving."""


@dataclass(frozen=True)
class GgufCheck:
    """llama.cpp's greedy output vs the HF model's, from identical prompt token ids."""

    num_prompts: int
    max_new_tokens: int
    identical: int
    """Prompts whose greedy continuation is token-for-token identical (up to ``max_new_tokens`` or end of turn)."""
    agreement: float
    """Mean fraction of each continuation that matches before the first differing token (1.0 = identical)."""
    tokenization_agreement: float
    """Fraction of prompts that llama.cpp tokenises (from the rendered text) exactly as training did."""
    samples: tuple[dict[str, Any], ...] = ()
    """First prompts' token ids from HF and llama.cpp, for a report."""

    @property
    def all_identical(self) -> bool:
        return self.identical == self.num_prompts


@dataclass(frozen=True)
class GgufResult:
    path: str
    quant: str
    size_bytes: int
    tensor_types: dict[str, int]
    """How many tensors of each GGML type were written (shows K-quant fallbacks)."""
    modelfile: str
    template_family: str | None
    check: GgufCheck | None
    warnings: tuple[str, ...]
    llama_cpp_version: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.check is not None:
            out["check"]["all_identical"] = self.check.all_identical
        return out

    def summary(self) -> str:
        text = f"{self.path} ({self.quant}, {self.size_bytes / 2**20:.1f} MiB); Modelfile template: " \
               f"{self.template_family or 'none (not recognised)'}"
        if self.check is not None:
            c = self.check
            text += (f"; llama.cpp vs HF greedy: {c.identical}/{c.num_prompts} identical, agreement "
                     f"{c.agreement:.1%}, tokenisation agreement {c.tokenization_agreement:.0%}")
        return text


def to_gguf(model_dir: str | Path, out_dir: str | Path, quant: str = "f16", *, verify: bool = True,
            max_new_tokens: int = 24, conversations: list[list[dict[str, Any]]] | None = None,
            n_threads: int | None = None) -> GgufResult:
    """Convert ``model_dir`` (a merged or full HF model folder) to ``out_dir/model-<quant>.gguf``, with its own
    Ollama Modelfile (``model-<quant>.Modelfile``) and record (``model-<quant>.export.json``): several types exported
    into one folder never overwrite each other's."""
    quant = quant.lower()
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: unknown GGUF type", hint=f"use one of {', '.join(QUANTS)}")
    version = llama_cpp_version()
    converter = find_converter()
    source = _model_folder(model_dir)
    out = output_folder(out_dir, create=True)
    target = out / f"model-{quant}.gguf"
    warnings: list[str] = []

    if quant in FLOAT_TYPES:
        _convert(converter, source, target, quant, out / f"model-{quant}.convert.log")
    else:
        intermediate = out / f"model-{_intermediate_type(source)}.tmp.gguf"
        _convert(converter, source, intermediate, _intermediate_type(source), out / f"model-{quant}.convert.log")
        try:
            _quantize(intermediate, target, quant, n_threads)
        finally:
            intermediate.unlink(missing_ok=True)
    types = _tensor_types(target)
    if "_k" in quant and any(t in types for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")):
        warnings.append(f"{quant}: some tensors fell back to legacy types ({_counts(types)}): llama.cpp needs rows "
                        "that are a multiple of 256 for K-quants")

    tokenizer = _tokenizer(source)
    match = match_template(tokenizer)
    modelfile = write_modelfile(out / f"model-{quant}.Modelfile", target.name, match)
    if match.family is None:
        warnings.append("the chat template matched no known family: the Modelfile has no TEMPLATE; check "
                        "`ollama show NAME --template` against the training template")
    if match.default_system is not None and not system_fits_modelfile(match.default_system):
        warnings.append("the chat template's default system message cannot be written in a Modelfile (it holds "
                        "three quotes in a row or ends with one): the Modelfile has no SYSTEM; requests without a "
                        "system message get none")
    if match.unsupported_roles:
        warnings.append(f"the chat template refuses {', '.join(match.unsupported_roles)} messages; Ollama would "
                        "still render them")

    check = None
    if verify:
        convs = conversations or conversations_for(trained_in(source), limit=8)
        check = _check(source, target, tokenizer, convs, max_new_tokens, n_threads)
        if quant == "f32" and not check.all_identical:
            failed = target.with_name(target.name + ".failed")
            os.replace(target, failed)  # not left where a user or the Modelfile would pick it up
            modelfile.unlink()
            report = ExportRecord(stage="export", kind="gguf", source=str(source), failed=True,
                                  result={"quant": quant, "check": asdict(check), "llama_cpp_version": version},
                                  versions=versions()).write(out, f"model-{quant}.export.json")
            raise RunError(f"{target}: llama.cpp's greedy output differs from the HF model in f32 "
                           f"({check.identical}/{check.num_prompts} prompts identical): the conversion is wrong; "
                           f"the file was moved to {failed}", hint=f"report it with {report}")
        if quant in FLOAT_TYPES and not check.all_identical:
            warnings.append(f"{quant}: {check.num_prompts - check.identical} of {check.num_prompts} greedy "
                            "continuations differ from the HF model (16-bit rounding on near-tied tokens)")
        if quant not in FLOAT_TYPES and check.agreement < QUANT_AGREEMENT_WARNING:
            larger = "q8_0 or f16" if quant != "q8_0" else "f16"
            warnings.append(f"{quant}: llama.cpp's greedy output follows the HF model's for {check.agreement:.0%} of "
                            f"each answer before they part (mean over {check.num_prompts} prompts; below "
                            f"{QUANT_AGREEMENT_WARNING:.0%}): this "
                            f"quantisation changes what the model says; use {larger}, or score this GGUF with "
                            "`tunesmith eval --model` before serving it")
        if check.tokenization_agreement < 1.0:
            warnings.append("llama.cpp tokenises some prompts differently from training: served prompts will not "
                            "match the trained token sequence exactly")

    result = GgufResult(path=str(target), quant=quant, size_bytes=target.stat().st_size, tensor_types=types,
                        modelfile=str(modelfile), template_family=match.family, check=check,
                        warnings=tuple(warnings), llama_cpp_version=version)
    ExportRecord(stage="export", kind="gguf", source=str(source), result=result.to_dict(),
                 versions=versions()).write(out, f"model-{quant}.export.json")
    return result


def refuse_run_folder(model_dir: str | Path) -> None:
    """A train run folder given where its model is expected: one message naming the folder to export instead."""
    path = Path(model_dir)
    if not (path / TrainRun.FILE).is_file():
        return
    run = TrainRun.read(path)
    if run.method == "full":
        model = run.artefact(path)
        raise UserError(f"{path}: this is a train run folder; its model is {model} — export that",
                        hint=f"tunesmith export {model}")
    raise UserError(f"{path}: this is a {run.method} train run folder (an adapter, not a model); merge it first",
                    hint=f"tunesmith merge {path} (writes {path / 'merged'}), then tunesmith export {path / 'merged'}")


def _model_folder(model_dir: str | Path) -> Path:
    from ..config import ModelConfig
    from ..models import resolve_model_path

    refuse_run_folder(model_dir)
    given, name = Path(model_dir), str(model_dir)
    hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))  # resolved (or refused) below
    hint = "pass a model folder: a merged one (tunesmith merge RUN writes RUN/merged) or a full fine-tuning run's " \
           "RUN/model"
    if given.is_file() and given.suffix.lower() != ".gguf":
        raise UserError(f"{model_dir}: is a file, not a model folder", hint=hint)
    if not given.exists() and not hub_id:
        raise UserError(f"{model_dir}: not found", hint=hint)
    path = Path(resolve_model_path(ModelConfig(name_or_path=str(model_dir))))
    if not path.is_dir():
        raise UserError(f"{model_dir}: GGUF export needs a local model folder (config.json + safetensors)",
                        hint="merge the adapter first: tunesmith merge RUN_DIR --out merged/")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(f"{path}: this is a LoRA adapter, not a model",
                        hint=f"merge it first: tunesmith merge {path} --out merged/, then export merged/")
    return path


def _intermediate_type(source: Path) -> str:
    """bf16 for bf16 checkpoints (no range loss), else f16; the quantizer reads either."""
    return "bf16" if _stored_dtype(source) == "bfloat16" else "f16"


def _convert(converter: Path, source: Path, target: Path, outtype: str, log_path: Path) -> None:
    staging = target.with_name(target.name + ".partial")
    cmd = [sys.executable, str(converter), str(source), "--outfile", str(staging), "--outtype", outtype]
    try:
        processes.run(cmd, what=f"llama.cpp's converter on {source}", log_path=log_path)
    except RunError:
        free = free_space(staging)
        staging.unlink(missing_ok=True)
        log = processes.log_tail(log_path, lines=200)
        if out_of_space(log, free):
            raise disk_full(target, _float_bytes(source, outtype), what="the GGUF file") from None
        arch = _architecture(source)
        if "is not supported" in log:
            raise UserError(f"{source}: architecture {arch} is not supported by llama.cpp's GGUF converter "
                            f"(llama-cpp-python {llama_cpp_version()})",
                            hint="GGUF needs an architecture llama.cpp implements (Llama, Mistral, Qwen2/3, Gemma, "
                                 f"Phi-3 …): `python {converter} --print-supported-models` lists them; export this "
                                 "model with --format awq or serve the merged folder with vLLM instead") from None
        if "pre-tokenizer" in log and "not recognized" in log.lower():
            raise UserError(f"{source}: llama.cpp does not recognise this tokenizer's pre-tokenizer",
                            hint="llama.cpp converts tokenizers it knows by hash; a freshly trained byte-level BPE "
                                 "is not among them (a SentencePiece-style byte-fallback BPE is)") from None
        raise  # the RunError names the log file and quotes its last lines
    except BaseException:  # interrupted: no partial file is left behind
        staging.unlink(missing_ok=True)
        raise
    if not staging.is_file():
        raise RunError(f"llama.cpp's converter wrote no {staging.name} for {source}; its output is in {log_path}")
    os.replace(staging, target)


def _float_bytes(source: Path, outtype: str) -> int:
    """About how large the converter's f32/f16/bf16 file is: the source's safetensors rescaled to ``outtype``."""
    stored = {"float32": 4, "float16": 2, "bfloat16": 2}.get(_stored_dtype(source), 4)
    return sum(f.stat().st_size for f in source.glob("*.safetensors")) * (4 if outtype == "f32" else 2) // stored


def _stored_dtype(source: Path) -> str:
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "float32"
    return config.get("dtype") or config.get("torch_dtype") or "float32"


def _quantize(source: Path, target: Path, quant: str, n_threads: int | None) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = n_threads or 0
    staging = target.with_name(target.name + ".partial")
    log = target.with_name("quantize.log")
    with _native_output_to(log):
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(staging).encode(), ctypes.byref(params))
    if code != 0 or not staging.is_file():
        free = free_space(staging)
        staging.unlink(missing_ok=True)
        text = log.read_text(encoding="utf-8", errors="replace")
        if out_of_space(text, free):
            raise disk_full(target, what=f"the {quant} GGUF file")
        tail = "\n".join(text.splitlines()[-6:])
        raise RunError(f"llama.cpp's quantizer failed ({quant}, return code {code}) on {source}:\n{tail}")
    os.replace(staging, target)


@contextlib.contextmanager
def _native_output_to(path: Path) -> Iterator[None]:
    """Send what llama.cpp's C code prints (a line per tensor) to a log file instead of the user's terminal: a
    library never prints. File descriptors 1 and 2 are redirected, so C-level writes are caught too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "wb") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def _counts(types: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in types.items())


def _architecture(source: Path) -> str:
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "?"
    return ",".join(config.get("architectures") or [config.get("model_type", "?")])


def _tokenizer(source: Path) -> Any:
    from ..config import ModelConfig
    from ..models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(source)))


def _check(source: Path, gguf_path: Path, tokenizer: Any, conversations: list[list[dict[str, Any]]],
           max_new_tokens: int, n_threads: int | None) -> GgufCheck:
    """Greedy continuations of the same prompt ids from HF (float32) and llama.cpp, compared token by token."""
    import llama_cpp
    import torch

    from ..chat import end_of_turn_ids, prompt_ids, render
    from ..config import ModelConfig
    from ..models import load_model

    stops = set(end_of_turn_ids(tokenizer))
    prompts = [prompt_part(c) for c in conversations]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    model = load_model(ModelConfig(name_or_path=str(source)), dtype=torch.float32, device_map="cpu")
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=max(len(i) for i in ids) + max_new_tokens + 8, n_threads=n_threads,
                          n_gpu_layers=0, verbose=False)
    identical = 0
    agreement = 0.0
    same_tokens = 0
    samples = []
    for prompt, prompt_tokens in zip(prompts, ids, strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_tokens]), attention_mask=torch.ones(1, len(prompt_tokens),
                                 dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)
        want = _until_stop(out[0, len(prompt_tokens):].tolist(), stops, max_new_tokens)
        got = _until_stop(_llama_greedy(llm, prompt_tokens, stops, max_new_tokens), stops, max_new_tokens)
        prefix = next((k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
        identical += int(want == got)
        agreement += 1.0 if want == got else prefix / max(len(want), len(got), 1)
        text = render(tokenizer, prompt, add_generation_prompt=True)
        # What a server does with a chat request: render the template, then tokenise the text itself.
        same_tokens += int(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == prompt_tokens)
        if len(samples) < 2:
            samples.append({"prompt_tokens": len(prompt_tokens), "hf": want, "llama_cpp": got})
    n = len(prompts)
    return GgufCheck(num_prompts=n, max_new_tokens=max_new_tokens, identical=identical, agreement=agreement / n,
                     tokenization_agreement=same_tokens / n, samples=tuple(samples))


def _llama_greedy(llm: Any, prompt_tokens: list[int], stops: set[int], max_new_tokens: int) -> list[int]:
    tokens: list[int] = []
    for token in llm.generate(prompt_tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
        tokens.append(token)
        if token in stops or len(tokens) >= max_new_tokens:
            break
    return tokens


def _until_stop(tokens: list[int], stops: set[int], limit: int) -> list[int]:
    out = []
    for token in tokens[:limit]:
        out.append(token)
        if token in stops:
            break
    return out

