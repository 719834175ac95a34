"""Host-side cost of the per-step work on FSDP2's DTensor parameters, on the CPU (gloo): gradient clipping and the
AdamW step over the 448 LoRA adapters of a 32-layer model, plain tensors (one process) vs DTensors (two processes,
sharded and replicated). The model is tiny, so the times are dispatch overhead, not arithmetic.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/dtensor_step_cpu.py                    # plain tensors
    OMP_NUM_THREADS=1 PYTHONPATH=src torchrun --standalone --nproc-per-node 2 bench/dtensor_step_cpu.py [--replicate]

Prints one RESULT line (ms per call, median of 7 after one warm-up) from the main process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--replicate", action="store_true")
    a = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunesmith.train.distributed import init_processes, shard
    from tunesmith.train.loop import _clip

    procs = init_processes()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=32, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=16, target_modules=targets))
    if procs.distributed:
        shard(model, procs, "lora", None, replicate=a.replicate)
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.ones_like(q)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def ms(fn) -> float:
        fn()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return round(statistics.median(times), 1)

    out = dict(processes=procs.world, layout=("replicate" if a.replicate else "shard") if procs.distributed else
               "plain", adapter_tensors=len(params),
               clip_grad_norm_ms=ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)),
               tunesmith_clip_ms=ms(lambda: _clip(params, 1.0)), adamw_step_ms=ms(optimizer.step))
    if procs.main:
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
