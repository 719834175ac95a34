"""Peak GPU memory of real training steps vs the advisor's estimate (tunesmith.hardware.memory).

A random-weight model of a catalogue shape (speed and memory do not depend on weight values) runs a few optimizer
steps per method, each method in its own process so one method's allocator state never leaks into the next.
The step mirrors what the memory model assumes: bf16 weights (or NF4 for QLoRA), PEFT LoRA r16/α32 with dropout
0.05 on all seven projections, bf16 autocast, SDPA, non-reentrant activation checkpointing, fused AdamW, and
tunesmith's chunked loss (or the plain transformers loss with --loss full).

One command on the GPU machine (prints one JSON line):

    PYTHONPATH=src python bench/advise_memory.py --shape 1b

CPU smoke check (no peak to measure there; checks the script runs end to end):

    PYTHONPATH=src python bench/advise_memory.py --shape tiny --seq 64 --bs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SHAPES = {"tiny": None, "1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(shape: str):
    from transformers import AutoConfig, LlamaConfig

    from tunesmith.hardware import catalog

    if SHAPES[shape] is None:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    fields = catalog.config_dict(catalog.MODELS[SHAPES[shape]])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def run_one(args: argparse.Namespace) -> dict:
    """One method, in this process: build, train ``steps`` optimizer steps, report peak and estimate."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.hardware.memory import architecture_from_config, estimate_memory, lora_trainable_params

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = model_config(args.shape)
    torch.manual_seed(0)
    method = args.one
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        folder = os.path.join(args.workdir, f"model-{args.shape}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            with torch.device(device):
                AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
            torch.cuda.empty_cache() if cuda else None
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": device.index or 0} if cuda else None,
                                                     attn_implementation="sdpa")
    else:
        dtype = torch.float32 if (method == "full" and args.full_precision == "mixed") else torch.bfloat16
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    if args.gc:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.randint(0, config.vocab_size, (args.bs, args.seq), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if args.loss == "chunked":
                from tunesmith.train.loss import linear_cross_entropy

                hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                loss, _ = linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                                               base.get_output_embeddings().weight, ids[:, 1:].reshape(-1))
            else:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps

    arch = architecture_from_config(config, args.shape)
    trainable, adapted = lora_trainable_params(config, 16, TARGETS) if method != "full" else (0, 0)
    est = estimate_memory(arch, method, args.bs, args.seq, lora_r=16, lora_trainable=trainable,
                          adapted_in_features=adapted, checkpointing="full" if args.gc else "none", logits=args.loss,
                          full_precision=args.full_precision, dropout_mask_bytes=1)
    measured = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"method": method, "measured_peak_gib": round(measured, 3) if measured is not None else None,
            "estimate_peak_gib": est.peak_allocated_gib,
            "error_pct": round(100 * (est.peak_allocated_gib - measured) / measured, 1) if measured else None,
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
            "estimate_total_gib": est.total_gib, "step_s": round(seconds, 3), "estimate": est.to_dict(),
            "params": arch.total_params, "trainable": trainable or arch.total_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="1b")
    parser.add_argument("--methods", default="lora,qlora,full", help="comma-separated: full, lora, qlora")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--loss", choices=["chunked", "full"], default="chunked")
    parser.add_argument("--no-gc", dest="gc", action="store_false", help="activation checkpointing off")
    parser.add_argument("--full-precision", choices=["mixed", "bf16"], default="mixed",
                        help="full fine-tuning: fp32 master weights + states (mixed) or everything in bf16")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "advise-bench"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("ONE " + json.dumps(run_one(args)), flush=True)
        return

    results = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", method]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ONE ")), None)
        if line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append({"method": method, "error": " | ".join(tail)})
        else:
            results.append(json.loads(line[4:]))
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(json.dumps({"bench": "advise_memory", "shape": args.shape, "seq": args.seq, "bs": args.bs,
                      "loss": args.loss, "gc": args.gc, "full_precision": args.full_precision, "device": device,
                      "torch": torch.__version__, "results": results}), flush=True)


if __name__ == "__main__":
    main()
