"""DPO with LoRA: TRL's ``DPOTrainer`` and tunesmith's DPO objective side by side on one GPU, same pairs.

Workload: a Llama-3.1-8B shape with random weights (bf16), LoRA r16 / alpha 32 / dropout 0.05 on all seven
projections (tunesmith's defaults, given to TRL as its ``peft_config``), sigmoid loss with beta 0.1, 16 preference
pairs per optimizer step (4 per micro-batch × 4 accumulation steps), variable-length pairs: prompt and each answer
log-normal (medians 256 and 192 tokens), a pair's longer sequence at most 2,048 tokens, uniform random token ids.
Both sides take the reference as the base with the adapters off (no second model).

    python bench/dpo_vs_trl.py all --out OUTDIR            # both sides, each in its own process; JSON + table
    python bench/dpo_vs_trl.py all --shape tiny --out D    # CPU smoke check of the script

TRL runs as its documentation shows a user: text pairs and a tokenizer (here a word-level tokenizer whose words are
the token ids, so that both sides see exactly the same ids: the script checks it), ``DPOConfig`` defaults (gradient
checkpointing on, padding to the batch's longest sequence) with bf16, the same batch, steps, learning rate and LoRA.
tunesmith runs its own loop (``tunesmith.train.fit``) with the plan ``tunesmith train`` would make for this model on
this GPU (packing, fused log-probabilities, compile, checkpointing as planned).

Numbers: tokens per second = the real (non-pad) tokens of both sequences of every pair, over the optimizer steps
after the warm-up ones (the pairs are drawn in different orders by the two sides, so the step's token count is the
workload's mean per pair × 16); peak allocated GPU memory of each side's process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_engine import SHAPES

PAIRS_PER_STEP = 16
MICRO = 4
EOS, PAD = 1, 0


def pairs(vocab: int, n: int, seq: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids, each answer ending with EOS; the longer side fits ``seq`` tokens."""
    rng = random.Random(0)

    def draw(median: float, low: int, high: int) -> int:
        return int(min(high, max(low, rng.lognormvariate(math.log(median), 0.7))))

    out = []
    for _ in range(n):
        prompt = draw(seq / 8, 16, seq // 2)
        chosen, rejected = draw(seq / 10.7, 8, seq - prompt - 1), draw(seq / 10.7, 8, seq - prompt - 1)
        ids = [rng.randrange(3, vocab) for _ in range(prompt + chosen + rejected)]
        out.append((ids[:prompt], [*ids[prompt:prompt + chosen], EOS], [*ids[prompt + chosen:], EOS]))
    return out


def tokens_per_pair(work: list[tuple[list[int], list[int], list[int]]]) -> float:
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in work) / len(work)


def word_tokenizer(vocab: int):
    """A tokenizer whose word ``t123`` is token 123: TRL tokenizes text, and these texts give the bench's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def _timer():
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.marks.append(time.perf_counter())

    return Marks()


def run_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = LlamaConfig(**SHAPES[a.shape], pad_token_id=PAD, eos_token_id=EOS)
    work = pairs(cfg.vocab_size, PAIRS_PER_STEP * (a.steps + a.warmup), a.seq)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if cuda else torch.float32)
    tokenizer = word_tokenizer(cfg.vocab_size)
    # TRL appends the EOS token to each answer itself
    rows = [{"prompt": text(p), "chosen": " " + text(c[:-1]), "rejected": " " + text(r[:-1])} for p, c, r in work]
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    args = DPOConfig(output_dir=str(Path(a.workdir) / "trl"), beta=0.1, loss_type=["sigmoid"], bf16=cuda,
                     use_cpu=not cuda, per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=PAIRS_PER_STEP // MICRO, max_steps=a.steps + a.warmup,
                     learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                     save_strategy="no", report_to=[], max_length=a.seq, dataset_num_proc=None, seed=0)
    timer = _timer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[timer])
    first = trainer.train_dataset[0]
    assert (first["prompt_ids"], first["chosen_ids"], first["rejected_ids"]) == work[0], \
        "TRL's tokenization differs from the bench's ids"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _result("trl", a, timer.marks, work, losses, cuda)


def run_tunesmith(a: argparse.Namespace) -> dict:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from dataclasses import replace

    import torch
    from accelerate import init_empty_weights
    from scale_out import _random_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunesmith.chat import IGNORE_INDEX, TokenizedChat
    from tunesmith.config import TrainConfig
    from tunesmith.train import StepSetup, fit
    from tunesmith.train.dataset import PreferencePair
    from tunesmith.train.distributed import allocate, init_processes
    from tunesmith.train.kernels import attention_implementation
    from tunesmith.train.loss import fused_head_supported
    from tunesmith.train.measure import measure_hardware
    from tunesmith.train.model import compile_decoder_layers, embeddings_to, prepare_model
    from tunesmith.train.pinned import PinnedPool
    from tunesmith.train.plan import describe, needs_host_link, plan_training

    procs = init_processes()
    device = procs.device
    cuda = device.type == "cuda"
    cfg = LlamaConfig(**SHAPES[a.shape], pad_token_id=PAD, eos_token_id=EOS)
    work = pairs(cfg.vocab_size, PAIRS_PER_STEP * (a.steps + a.warmup), a.seq)
    tcfg = TrainConfig(method="lora", objective="dpo", dpo={"beta": 0.1, "loss_type": "sigmoid"},
                       per_device_train_batch_size=MICRO, gradient_accumulation_steps=PAIRS_PER_STEP // MICRO,
                       max_length=a.seq, max_steps=a.steps + a.warmup, logging_steps=1, save_strategy="no",
                       eval_strategy="no", learning_rate=2e-4, lr_scheduler_type="constant", warmup_ratio=0.0,
                       seed=0, memory_limit_gb=a.memory_limit,
                       compile="auto" if a.compile == "auto" else a.compile == "on")
    plan = plan_training(cfg, tcfg, hardware=measure_hardware(device, host_link=needs_host_link(tcfg, 1)), world=1)
    print(f"plan: {describe(plan)} ({plan.reason})", flush=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=plan.precision.weights,
                                                 attn_implementation=attention_implementation(device.type, cuda))
    pinned = PinnedPool(plan.pinned) if plan.pinned is not None else None  # as train() does, before the model
    model = prepare_model(model, tcfg, replace(plan, compile_layers=False), pinned=pinned)  # compiled below
    allocate(model, device)
    _random_weights(model, device, 0)
    if plan.embeddings_on_cpu:
        embeddings_to(model, "cpu")
    if plan.compile_layers:
        compile_decoder_layers(model)

    def chat(prompt: list[int], answer: list[int]) -> TokenizedChat:
        return TokenizedChat(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)

    examples = [PreferencePair(chat(p, c), chat(p, r)) for p, c, r in work]
    marks: list[float] = []
    losses: list[float] = []

    def on_event(e: dict) -> None:
        if e.get("event") == "step":
            marks.append(time.perf_counter())
            losses.append(e["loss"])

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup = StepSetup(procs=procs, precision=plan.precision, optimizer=plan.optimizer, pad_id=PAD, packed=cuda,
                      fused_loss=fused_head_supported(model), preference=tcfg.dpo, pinned=pinned)
    fit(model=model, setup=setup, tcfg=tcfg, train_examples=examples, eval_examples=[],
        out=Path(a.workdir) / "tunesmith", emit=on_event)
    return _result("tunesmith", a, marks, work, losses, cuda) | {"memory_limit_gib": a.memory_limit,
        "plan": describe(plan), "compile": plan.compile_layers, "packed": cuda,
        "planned_peak_gib": plan.estimate_gib}


def _result(side: str, a: argparse.Namespace, marks: list[float], work: list, losses: list[float],
            cuda: bool) -> dict:
    import torch

    timed = marks[a.warmup:]
    dt = timed[-1] - marks[a.warmup - 1]
    tps = len(timed) * PAIRS_PER_STEP * tokens_per_pair(work) / dt
    return {"side": side, "shape": a.shape, "steps_timed": len(timed), "step_s": round(dt / len(timed), 3),
            "tokens_per_s": round(tps, 1), "tokens_per_pair": round(tokens_per_pair(work), 1),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU)", "torch": torch.__version__}


def run_all(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    sides = (("trl", "auto"), ("tunesmith", "auto")) + ((("tunesmith", "off"),) if a.uncompiled else ())
    for side, compile_ in sides:
        cmd = [sys.executable, __file__, side, "--shape", a.shape, "--steps", str(a.steps), "--warmup",
               str(a.warmup), "--seq", str(a.seq), "--workdir", str(out / "work" / f"{side}-{compile_}"),
               "--compile", compile_]
        trl_peak = results[0].get("peak_alloc_gib") if results else None
        if side == "tunesmith" and trl_peak:  # the plan fits TRL's measured peak (it checkpoints layers to)
            cmd += ["--memory-limit", str(trl_peak)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results.append({"side": side, "error": (proc.stderr or proc.stdout)[-3000:]})
        else:
            results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    trl, ours, *rest = results
    uncompiled = rest[0] if rest else {"error": "not run (--no-uncompiled)"}
    summary = {"bench": "dpo_vs_trl", "command": " ".join(["python", "bench/dpo_vs_trl.py", "all", "--shape",
                                                          a.shape, "--steps", str(a.steps), "--warmup",
                                                          str(a.warmup), "--seq", str(a.seq)]),
               "pairs_per_step": PAIRS_PER_STEP, "results": results}
    if "error" not in trl and "error" not in ours:
        summary["speedup"] = round(ours["tokens_per_s"] / trl["tokens_per_s"], 2)
        if trl["peak_alloc_gib"]:
            summary["peak_ratio"] = round(ours["peak_alloc_gib"] / trl["peak_alloc_gib"], 3)
    if "error" not in trl and "error" not in uncompiled:
        summary["speedup_uncompiled"] = round(uncompiled["tokens_per_s"] / trl["tokens_per_s"], 2)
    (out / "dpo_vs_trl.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["all", "trl", "tunesmith"])
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (compile, allocator)")
    parser.add_argument("--seq", type=int, default=2048, help="max tokens of a pair's sequence")
    parser.add_argument("--memory-limit", type=float, help="GiB the tunesmith plan must fit (all: TRL's peak)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="tunesmith's train.compile")
    parser.add_argument("--out", default="bench-dpo", help="folder for the JSON (all)")
    parser.add_argument("--uncompiled", action=argparse.BooleanOptionalAction, default=True,
                        help="all: also tunesmith with its layers not compiled")
    parser.add_argument("--workdir", default="bench-dpo/work")
    a = parser.parse_args()
    if a.side == "all":
        run_all(a)
        return
    result = run_trl(a) if a.side == "trl" else run_tunesmith(a)
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # compiled code can hold interpreter exit for minutes; the numbers are out


if __name__ == "__main__":
    main()
