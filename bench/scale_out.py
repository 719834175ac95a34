"""Scale-out benchmark: full fine-tuning and LoRA on 1, 2, 4 … GPUs with tunesmith's own loop and FSDP2.

One configuration per launch; the launcher is the only difference between GPU counts:

    python bench/scale_out.py run --shape 8b --method full                       # one GPU
    torchrun --standalone --nproc-per-node 4 bench/scale_out.py run --shape 8b --method full
    python bench/scale_out.py report --out OUTDIR OUTDIR/*.jsonl                 # table + scaling factors
    python bench/scale_out.py fp8 --seed-script PATH/seed_recipe.py --out OUTDIR  # seed vs bf16 vs FP8 base
    python bench/scale_out.py fp8full --out OUTDIR                               # full FT: bf16 vs FP8 products

``fp8`` (issue 26): in one call on one GPU, the seed recipe's LoRA (unchanged, a subprocess), then tunesmith's 8B
LoRA as ``tunesmith train`` plans it within the seed's memory with the bf16 base, then the same with
``train.base_precision: fp8`` — each in a fresh process — and writes ``OUTDIR/fp8_base.json`` and
``OUTDIR/fp8_base.md`` with the ratios.

``fp8full``: in one call on one GPU, tunesmith's 8B full fine-tuning as ``tunesmith train`` plans it (bf16 products),
then the same with ``train.matmul_precision: fp8`` — each in a fresh process — and writes ``OUTDIR/fp8_full.json``
and ``OUTDIR/fp8_full.md``: tokens/s, peak vs planned memory, the loss at every step and the ratio.

Workload (issues 8/9/11): a Llama shape with random weights (8B = Llama-3.1-8B, 70B = Llama-3.1-70B), the seed's
``--varlen`` chat lengths (log-normal, median ~410, [32, 2048]), 16 sequences per optimizer step PER GPU (weak
scaling: each GPU does the single-GPU step's work; the global batch grows with the GPU count), packed rows with
variable-length attention, max length 2048. Numerics and checkpointing are what ``tunesmith train`` would choose
(src/tunesmith/train/plan.py): full fine-tuning keeps fp32 master weights — 8-bit AdamW states on one GPU where
fp32 states do not fit, fp32 AdamW sharded by FSDP2 on several — and FSDP2 gathers bf16 weights and reduces fp32
gradients. The model is built on the meta device, sharded, then given random values shard by shard (as
``tunesmith train`` materialises a real checkpoint from the main process), so a 70B model never exists whole.

Reported per configuration: real tokens/s (all GPUs) and per GPU over the steps after the warm-up, model-FLOPs
utilisation (full 6·N' + 12·L·d·s̄, LoRA 4·N' + 12·L·d·s̄ FLOP per token, N' = matmul parameters incl. the head;
recomputation not counted) against 989 TFLOP/s per GPU, peak allocated memory of the busiest GPU; every step's
duration (``step_times_s``, untimed ones included) and tokens (``step_tokens``), step 3's seconds per token
against the median of the last three steps' (``step3_vs_steady``) and the pinned blocks torch's host allocator
created during the steps — with the plan's pinned CPU memory allocated before step 1 (``--pinned-pool on``, as
``tunesmith train`` runs) or as steps ask.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_engine import (  # the same shapes and sequences as the fast-engine bench, and its profiler summary
    SHAPES,
    _profile_summary,
    _profiler,
    run_seed,
    workload,
)

SHAPES = {**SHAPES,
          # Llama-3.1-70B
          "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)}
PEAK_SPEC = 989e12


def flops_per_token(cfg: object, lengths: list[int], method: str) -> float:
    d, n_layers, ffn = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    n_matmul = n_layers * (d * d * 2 + d * kv * 2 + 3 * d * ffn) + d * cfg.vocab_size
    s_bar = sum(s * s for s in lengths) / sum(lengths)
    return (6 if method == "full" else 4) * n_matmul + 12 * n_layers * d * s_bar


def run(a: argparse.Namespace) -> None:
    # fewer, growable segments: less fragmentation between packed rows of different lengths (before torch loads)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from dataclasses import replace

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunesmith.chat import TokenizedChat
    from tunesmith.config import TrainConfig
    from tunesmith.train import StepSetup, fit
    from tunesmith.train.distributed import allocate, init_processes, max_all, shard
    from tunesmith.train.fp8 import quantize_frozen_base
    from tunesmith.train.fp8_training import RECIPE, to_fp8_training
    from tunesmith.train.kernels import attention_implementation
    from tunesmith.train.loss import fused_head_supported
    from tunesmith.train.measure import measure_hardware
    from tunesmith.train.model import compile_decoder_layers, embeddings_to, prepare_model
    from tunesmith.train.pinned import PinnedPool
    from tunesmith.train.plan import describe, needs_host_link, plan_training, planned_peak_gib

    procs = init_processes()
    device = procs.device
    cfg = LlamaConfig(**SHAPES[a.shape])
    overrides = {} if a.ckpt is None else {"gradient_checkpointing": a.ckpt != "0"}
    tcfg = TrainConfig(method=a.method, per_device_train_batch_size=a.bs, gradient_accumulation_steps=16 // a.bs,
                       max_length=2048, max_steps=a.steps + a.warmup, logging_steps=1, save_strategy="no",
                       eval_strategy="no", learning_rate=1e-5 if a.method == "full" else 2e-4, seed=0,
                       compile=bool(a.compile), memory_limit_gb=a.memory_limit, sharding=a.sharding,
                       packed_row_tokens=a.rows, offload_checkpoints="auto" if a.offload == "auto" else False,
                       optim=a.optim, base_precision=a.base_precision, matmul_precision=a.matmul_precision,
                       **overrides)
    hardware = measure_hardware(device, host_link=needs_host_link(tcfg, procs.world))
    plan = plan_training(cfg, tcfg, hardware=hardware, world=procs.world)
    precision = plan.precision
    layers = plan.checkpointed_layers if a.ckpt in (None, "0") else int(a.ckpt)
    planned = plan.estimate_gib
    if a.ckpt is not None and procs.world == 1 and planned is not None:  # the estimate for the layers it runs
        planned = planned_peak_gib(cfg, tcfg, hardware=hardware, optimizer=plan.optimizer, checkpointed=layers)
    recipe = a.fp8_recipe or RECIPE
    if procs.main:
        print(f"plan: {describe(plan)} ({plan.reason})", flush=True)

    t0 = time.perf_counter()
    # as train() does: the plan's pinned CPU memory before the model (--pinned-pool off: allocated as steps need it)
    pinned = PinnedPool(plan.pinned) if plan.pinned is not None and a.pinned_pool == "on" else None
    attn = attention_implementation(device.type, packing=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=precision.weights, attn_implementation=attn)
    # the product's build order, but sharded and given random weights here (not read from a checkpoint)
    # the FP8 base is quantised from real values: after the random weights below, before compile
    # FP8 products with the product's recipe through prepare_model; another recipe is converted here, in its place
    model = prepare_model(model, tcfg, replace(plan, checkpointed_layers=layers, compile_layers=False, fp8_base=False,
                                               fp8_matmuls=plan.fp8_matmuls and recipe == RECIPE), pinned=pinned)
    if plan.fp8_matmuls and recipe != RECIPE:
        to_fp8_training(model, recipe=recipe)
    if procs.distributed:
        shard(model, procs, a.method, precision.autocast, plan.sharding == "replicate", plan.reshard_after_forward)
    allocate(model, device)
    _random_weights(model, device, procs.rank)
    if plan.fp8_base:
        quantize_frozen_base(model)
    if plan.embeddings_on_cpu:
        embeddings_to(model, "cpu")
    if a.compile:
        compile_decoder_layers(model)
    build_s = time.perf_counter() - t0

    per_gpu = 16
    seqs = workload(cfg.vocab_size, per_gpu * procs.world * (a.steps + a.warmup), 2048)
    examples = [TokenizedChat(s, list(s)) for s in seqs]
    fpt = flops_per_token(cfg, [len(s) for s in seqs], a.method)
    marks: list[tuple[float, int, float]] = []
    losses: list[float] = []
    prof = _profiler() if a.profile and procs.main else None

    def on_event(e: dict) -> None:
        if e.get("event") == "step":
            marks.append((time.perf_counter(), e["tokens"], e["loss"]))
            losses.append(round(e["loss"], 4))
            if prof is not None:
                prof.step()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = dict(shape=a.shape, method=a.method, gpus=procs.world, bs=a.bs, rows_tokens=a.rows or a.bs * 2048,
               offload_checkpoints=plan.offload_checkpoints, embeddings_on_cpu=plan.embeddings_on_cpu,
               optimizer=plan.optimizer, master_weights=plan.master_weights, checkpointed_layers=layers,
               offloaded_layers=plan.offloaded_layers,
               sharding=plan.sharding, reshard_after_forward=plan.reshard_after_forward,
               of_layers=plan.layers, compile=a.compile, planned_peak_gib=planned,
               build_s=round(build_s, 1), sequences_per_step=per_gpu * procs.world, label=a.label, loss=a.loss,
               fp8_base=plan.fp8_base, fp8_matmuls=plan.fp8_matmuls,
               fp8_recipe=recipe if plan.fp8_matmuls else None, warmup=a.warmup, steps=a.steps,
               pinned_pool=a.pinned_pool, planned_pinned_gib=plan.pinned and
               round(plan.pinned.total_gib, 2), **(pinned.stats() if pinned is not None else {}))
    if prof is not None:
        prof.start()
    host = _host_allocations() if cuda else {}
    fit_start = time.perf_counter()
    try:
        setup = StepSetup(procs=procs, precision=precision, optimizer=plan.optimizer, pad_id=0, packed=True,
                          fused_loss=a.loss != "model-head" and fused_head_supported(model), pinned=pinned)
        fit(model=model, setup=setup, tcfg=tcfg, train_examples=examples, eval_examples=[],
            out=Path(a.workdir) / f"{a.label or a.method}-{procs.world}",
            emit=on_event if procs.main else (lambda _e: None))
        peak = max_all(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, procs)
        if prof is not None:
            prof.stop()
            out["profile"] = _profile_summary(prof, marks)
        if procs.main:
            timed = marks[a.warmup:]
            dt = timed[-1][0] - marks[a.warmup - 1][0]
            tps = sum(t for _, t, _ in timed) / dt
            # every step's duration, untimed ones included (step 1's counts from fit(): the optimizer's creation
            # and the first compilation), and step 3 against the steady time (the median of the last three)
            times = [b - a_ for a_, b in zip([fit_start] + [m[0] for m in marks[:-1]], [m[0] for m in marks],
                                             strict=True)]
            # steps hold different token counts (16 var-length sequences each): compared per token
            per_token = [t / m[1] for t, m in zip(times, marks, strict=True)]
            steady = sorted(per_token[-3:])[len(per_token[-3:]) // 2]
            during = _host_allocations() if cuda else {}
            out.update(step_times_s=[round(t, 3) for t in times], step_tokens=[m[1] for m in marks],
                       step3_vs_steady=round(per_token[2] / steady, 3) if len(times) >= 4 else None,
                       host_allocs_during_steps=during.get("num_host_alloc", 0) - host.get("num_host_alloc", 0),
                       host_alloc_s_during_steps=round((during.get("host_alloc_time.total", 0)
                                                        - host.get("host_alloc_time.total", 0)) / 1e6, 2),
                       **({"pinned_misses": pinned.misses, "pinned_miss_gib": round(pinned.miss_bytes / 2**30, 3)}
                          if pinned is not None else {}))
            out.update(step_s=round(dt / len(timed), 3), tokens_per_s=round(tps, 1),
                       tokens_per_s_per_gpu=round(tps / procs.world, 1),
                       mfu=round(tps * fpt / (PEAK_SPEC * procs.world), 4), gflop_per_token=round(fpt / 1e9, 2),
                       peak_alloc_gib=round(peak, 2), loss_first=round(marks[0][2], 4),
                       loss_last=round(marks[-1][2], 4), losses=losses)
    except torch.cuda.OutOfMemoryError as exc:
        out.update(error=f"OOM: {str(exc)[:200]}",
                   peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if procs.main or "error" in out:
        line = "RESULT " + json.dumps(out)
        print(line, flush=True)
        if a.jsonl and procs.main:
            with open(a.jsonl, "a") as fh:
                fh.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # compiled code and NCCL threads can hold interpreter exit for minutes; the numbers are out


def _host_allocations() -> dict:
    """torch's caching host allocator so far: pinned blocks created (``num_host_alloc``) and the microseconds spent
    creating them (``host_alloc_time.total``)."""
    import torch

    return torch.cuda.memory.host_memory_stats()


def _random_weights(model: object, device: object, rank: int) -> None:
    """Random values for an allocated model (sharded or not): N(0, 0.02) weights drawn per local shard, unit norms,
    zero LoRA B (an adapter starts as the identity). Weights FSDP2 leaves whole on every process (a replicated
    run's frozen base) are drawn from one seed, so every process holds the same model."""
    import torch

    per_rank = torch.Generator(device=device).manual_seed(1234 + rank)
    shared = torch.Generator(device=device).manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            sharded = hasattr(p, "to_local")
            local = p.to_local() if sharded else p
            if "lora_B" in name:
                local.zero_()
            elif "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=per_rank if sharded else shared)


# --- seed recipe vs the bf16 base vs the FP8 base, one call ---------------------------------------------------------

FP8_RUN = ["--shape", "8b", "--method", "lora", "--bs", "4", "--rows", "12288", "--memory-limit", "22.99"]
"""The issue's LoRA row: 8B, rows of 12,288 tokens, planned within the seed recipe's 21.15 GiB (22.99 GB limit)."""


def fp8(a: argparse.Namespace) -> None:
    """The seed's LoRA, then the planned run with the bf16 base and with the FP8 base, each in its own process."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "fp8_base.jsonl"
    jsonl.unlink(missing_ok=True)
    started = time.perf_counter()
    seed = run_seed(a.seed_script, ["--method", "lora", "--varlen"], a.seed_timeout)
    print("ROW " + json.dumps(seed), flush=True)
    errors = {}
    for precision in ("auto", "fp8"):
        cmd = [sys.executable, __file__, "run", *FP8_RUN, *(["--compile"] if a.compile else []),
               "--warmup", str(a.warmup), "--steps", str(a.steps),
               "--base-precision", precision, "--label", f"lora-8b-{precision}-base", "--jsonl", str(jsonl)]
        errors[precision] = _fresh_process(cmd, precision, a.run_timeout)
    rows = {r["label"]: r for r in _rows(str(jsonl))} if jsonl.exists() else {}
    bf16 = rows.get("lora-8b-auto-base", {"error": errors.get("auto")})
    fp8_row = rows.get("lora-8b-fp8-base", {"error": errors.get("fp8")})

    def ratio(r: dict, base: dict) -> float | None:
        return round(r["tokens_per_s"] / base["tokens_per_s"], 2) if "tokens_per_s" in r and "tokens_per_s" in base \
            else None

    summary = dict(command=(f"python3 bench/scale_out.py fp8 --seed-script SEED --out OUT --warmup {a.warmup} "
                            f"--steps {a.steps}" + ("" if a.compile else " --no-compile")),
                   runs=" ".join(FP8_RUN) + (" --compile" if a.compile else ""), gpu=_gpu(),
                   wall_s=round(time.perf_counter() - started, 1),
                   seed=seed, bf16_base=bf16, fp8_base=fp8_row,
                   bf16_vs_seed=ratio(bf16, seed), fp8_vs_seed=ratio(fp8_row, seed), fp8_vs_bf16=ratio(fp8_row, bf16))
    (out / "fp8_base.json").write_text(json.dumps(summary, indent=1))
    lines = ["| run | tokens/s | × seed | peak GiB (planned) | checkpointed + offloaded of layers | loss first → last "
             "|",
             "|---|---|---|---|---|---|",
             f"| seed recipe (`--method lora --varlen`) | {seed.get('tokens_per_s', seed.get('error', '—'))} | 1.00 | "
             f"{seed.get('peak_alloc_gb', '—')} | | |"]
    for name, r, x in (("tunesmith, bf16 base", bf16, summary["bf16_vs_seed"]),
                       ("tunesmith, FP8 base", fp8_row, summary["fp8_vs_seed"])):
        if "tokens_per_s" not in r:
            lines.append(f"| {name} | {str(r.get('error', 'no result'))[:80]} | | | | |")
            continue
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {x} | {r['peak_alloc_gib']} ({r['planned_peak_gib']}) | "
                     f"{r['checkpointed_layers']} + {r['offloaded_layers']} of {r['of_layers']} | "
                     f"{r['loss_first']} → {r['loss_last']} |")
    lines += ["", f"FP8 base vs bf16 base: {summary['fp8_vs_bf16']}×; GPU: {summary['gpu']}; "
                  f"whole call {summary['wall_s']} s"]
    (out / "fp8_base.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


FP8_FULL_RUN = ["--shape", "8b", "--method", "full", "--bs", "2", "--compile"]
"""The full-fine-tuning row of the one-GPU benchmark (bench/results/scale_out.md): 8B, rows of 4,096 tokens, compiled
layers, the plan's optimizer (bf16 weights + torchao 8-bit AdamW on an H200) and checkpointing."""


def fp8full(a: argparse.Namespace) -> None:
    """8B full fine-tuning as planned, with bf16 products then FP8 products, each in its own process."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "fp8_full.jsonl"
    jsonl.unlink(missing_ok=True)
    started = time.perf_counter()
    arms = [("bf16", "auto", None)] + [(f"fp8-{r}", "fp8", r) for r in a.recipes]
    errors = {}
    for n, (label, precision, recipe) in enumerate(arms):
        cmd = [sys.executable, __file__, "run", *FP8_FULL_RUN, "--warmup", str(a.warmup), "--steps", str(a.steps),
               "--matmul-precision", precision, *(["--fp8-recipe", recipe] if recipe else []),
               "--label", f"full-8b-{label}", "--jsonl", str(jsonl)]
        # each run gets run_timeout, within what is left of the call's deadline less a minute for each run after it
        # (the tables are written either way)
        left = a.deadline_s - (time.perf_counter() - started) - 5 - 60 * (len(arms) - 1 - n)
        errors[label] = _fresh_process(cmd, label, max(1, int(min(a.run_timeout, left))))
    rows = {r["label"]: r for r in _rows(str(jsonl))} if jsonl.exists() else {}
    results = {label: rows.get(f"full-8b-{label}", {"error": errors.get(label)}) for label, _, _ in arms}
    bf16 = results["bf16"]

    def ratio(r: dict) -> float | None:
        return round(r["tokens_per_s"] / bf16["tokens_per_s"], 3) if "tokens_per_s" in r and "tokens_per_s" in bf16 \
            else None

    def loss_gap(r: dict) -> float | None:  # the largest relative difference from bf16's loss at the same step
        if "losses" not in r or "losses" not in bf16:
            return None
        return round(max(abs(x - y) / y for x, y in zip(r["losses"], bf16["losses"], strict=False)), 5)

    summary = dict(command=f"python3 bench/scale_out.py fp8full --out OUT --warmup {a.warmup} --steps {a.steps} "
                           f"--recipes {' '.join(a.recipes)}",
                   runs=" ".join(FP8_FULL_RUN), gpu=_gpu(), wall_s=round(time.perf_counter() - started, 1),
                   arms=results, fp8_vs_bf16={label: ratio(r) for label, r in results.items() if label != "bf16"},
                   loss_gap_vs_bf16={label: loss_gap(r) for label, r in results.items() if label != "bf16"})
    (out / "fp8_full.json").write_text(json.dumps(summary, indent=1))
    lines = ["| run | tokens/s | × bf16 | MFU (989) | peak GiB (planned) | checkpointed of layers | optimizer | loss "
             "first → last | largest loss gap vs bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if "tokens_per_s" not in r:
            lines.append(f"| {label} | {str(r.get('error', 'no result'))[-120:]!r} | | | | | | | |")
            continue
        gap = summary["loss_gap_vs_bf16"].get(label)
        lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {ratio(r)} | {r['mfu']:.1%} | {r['peak_alloc_gib']} "
                     f"({r['planned_peak_gib']}) | {r['checkpointed_layers']} of {r['of_layers']} | "
                     f"{r['optimizer']} | {r['loss_first']} → {r['loss_last']} | "
                     f"{'' if gap is None else f'{gap:.2%}'} |")
    lines += ["", f"GPU: {summary['gpu']}; {a.warmup} untimed + {a.steps} timed steps per run; whole call "
                  f"{summary['wall_s']} s"]
    (out / "fp8_full.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fresh_process(cmd: list[str], label: str, timeout: int) -> str:
    """Run one arm of a comparison in its own process (its output echoed); the tail of what it printed, or the
    timeout, kept as the arm's error should it write no result row."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{label}: timeout after {timeout}s", flush=True)
        return f"timeout after {timeout}s"
    sys.stdout.write(proc.stdout[-2000:] + proc.stderr[-3000:])
    return (proc.stderr or proc.stdout)[-400:]


def _gpu() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# --- the report ----------------------------------------------------------------------------------------------------


def report(a: argparse.Namespace) -> None:
    """One table per results file (one device call: ratios within it); a call without one-GPU rows takes them from
    ``--baseline`` and says so."""
    base = _rows(a.baseline) if a.baseline else []
    tables, every = [], []
    for f in a.files:
        rows = _rows(f)
        every += [{**r, "call": Path(f).stem} for r in rows]
        own = {(r["shape"], r["method"], r["compile"]): r for r in rows if r["gpus"] == 1 and "tokens_per_s" in r}
        ref = {(r["shape"], r["method"], r["compile"]): r for r in base if r["gpus"] == 1 and "tokens_per_s" in r}
        lines = [f"### {Path(f).stem}", "",
                 "| shape | method | GPUs | compile | optimizer (master weights) | FSDP2 layout | checkpointed | loss "
                 "| tokens/s | per GPU | × 1 GPU | MFU (989/GPU) | peak GiB/GPU (planned) |", "|---" * 13 + "|"]
        for r in sorted(rows, key=lambda r: (r["shape"], r["method"], r["compile"], r["gpus"])):
            layout = r.get("sharding") or ("shard, reshard" if r["gpus"] > 1 else "—")  # before the layout plan
            if r.get("sharding") == "shard":
                layout += ", keep gathered" if r.get("reshard_after_forward") is False else ", reshard"
            head = (f"| {r['shape']} | {r['method']} | {r['gpus']} | {'yes' if r['compile'] else 'no'} | "
                    f"{r['optimizer']} ({r['master_weights']}) | {layout} | "
                    f"{r['checkpointed_layers']}/{r['of_layers']} | {_loss(r, Path(f).stem)} |")
            if "tokens_per_s" not in r:
                lines.append(f"{head} {r.get('error', 'no result')[:80]} | | | | |")
                continue
            key = (r["shape"], r["method"], r["compile"])
            one, mark = (own[key], "") if key in own else (ref.get(key), "†")
            scale = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}×{mark}" if one and r["gpus"] > 1 else ""
            lines.append(f"{head} {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {scale} | "
                         f"{r['mfu']:.1%} | {r['peak_alloc_gib']} ({r['planned_peak_gib']}) |")
        if any("†" in line for line in lines):
            lines += ["", f"† against the one-GPU row of {Path(a.baseline).stem} (another call, same day)"]
        tables.append("\n".join(lines))
    text = "\n\n".join(tables)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_out.json").write_text(json.dumps(every, indent=1))
    (out / "scale_out_tables.md").write_text(text + "\n")


def _loss(r: dict, call: str) -> str:
    """Which loss a row ran: the fused head + cross-entropy, or the model's own logits. Rows before ``--loss``
    existed: one GPU fused, FSDP2 the model's head — except call8, the first fused FSDP2 version (decoder output read
    through ``output_hidden_states``)."""
    if r.get("loss") == "model-head":
        return "model head"
    if "loss" in r or r["gpus"] == 1:
        return "fused"
    return "fused (hidden states)" if call.startswith("call8") else "model head"


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one configuration (launch with torchrun for several GPUs)")
    r.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    r.add_argument("--method", choices=["full", "lora"], default="full")
    r.add_argument("--bs", type=int, default=2, help="packed row = bs × 2048 tokens; bs × accumulation = 16")
    r.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--ckpt", default=None, help="checkpointed layers (default: the memory plan's choice)")
    r.add_argument("--compile", action="store_true")
    r.add_argument("--loss", default="auto", choices=["auto", "model-head"],
                   help="auto: the loop's choice (fused head + cross-entropy); model-head: the model's own logits")
    r.add_argument("--profile", action="store_true", help="torch.profiler over steps 3-4 on the main process (its "
                   "timing is then slowed: use for where the time goes, not for tokens/s)")
    r.add_argument("--memory-limit", type=float, default=None, help="train.memory_limit_gb for the plan")
    r.add_argument("--sharding", default="auto", choices=["auto", "shard", "replicate"])
    r.add_argument("--rows", type=int, default=None, help="train.packed_row_tokens (default bs × 2048)")
    r.add_argument("--offload", default="auto", choices=["auto", "off"], help="train.offload_checkpoints")
    r.add_argument("--optim", default="auto", choices=["auto", "adamw_torch", "adamw_8bit", "adamw_8bit_bf16"],
                   help="train.optim")
    r.add_argument("--base-precision", default="auto", choices=["auto", "fp8"], help="train.base_precision (LoRA)")
    r.add_argument("--pinned-pool", default="on", choices=["on", "off"],
                   help="on: the plan's pinned CPU memory allocated before step 1 (as tunesmith train does); off: "
                        "torch's caching host allocator page-locks it as the steps ask")
    r.add_argument("--matmul-precision", default="auto", choices=["auto", "fp8"],
                   help="train.matmul_precision (full fine-tuning)")
    r.add_argument("--fp8-recipe", default=None, choices=["rowwise", "tensorwise"],
                   help="torchao's float8 recipe for --matmul-precision fp8 (default: the product's)")
    r.add_argument("--label", default="")
    r.add_argument("--jsonl", default=None, help="append the result row to this file")
    r.add_argument("--workdir", default="/tmp/scale_out")
    rep = sub.add_parser("report")
    rep.add_argument("--out", required=True)
    rep.add_argument("--baseline", default=None, help="results file whose one-GPU rows serve calls without any")
    rep.add_argument("files", nargs="+")
    f = sub.add_parser("fp8", help="seed recipe vs the bf16 base vs the FP8 base, 8B LoRA, one GPU, one call")
    f.add_argument("--seed-script", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--warmup", type=int, default=6, help="untimed steps of each tunesmith run (compilation)")
    f.add_argument("--steps", type=int, default=5, help="timed steps of each tunesmith run")
    f.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compiled decoder layers, as the plan runs LoRA on a GPU (--no-compile: eager, both runs)")
    f.add_argument("--seed-timeout", type=int, default=150)
    f.add_argument("--run-timeout", type=int, default=150)
    ff = sub.add_parser("fp8full", help="8B full fine-tuning, bf16 vs FP8 products, one GPU, one call")
    ff.add_argument("--out", required=True)
    ff.add_argument("--warmup", type=int, default=4, help="untimed steps of each run (compilation)")
    ff.add_argument("--steps", type=int, default=4, help="timed steps of each run")
    ff.add_argument("--recipes", nargs="+", default=["rowwise"], choices=["rowwise", "tensorwise"],
                    help="torchao recipes, one FP8 run each")
    ff.add_argument("--run-timeout", type=int, default=150, help="seconds per run at most")
    ff.add_argument("--deadline-s", type=int, default=600,
                    help="seconds for the whole call: each run keeps a minute for every run after it")
    a = p.parse_args()
    {"run": run, "report": report, "fp8": fp8, "fp8full": fp8full}[a.cmd](a)


if __name__ == "__main__":
    main()
