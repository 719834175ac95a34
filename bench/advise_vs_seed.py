"""The advisor's memory estimates beside peaks measured by other runs (no GPU needed: it only evaluates the model).

Rows: the seed recipe on one H200 (notes/performance.md; bench seed_recipe.py: transformers + PEFT + TRL 1.16
SFTTrainer, bf16 weights, SDPA, TRL's fused LM head, fused AdamW, Llama-3.1-8B shape, batch 4 × 2048) and
torchtune's published Llama-3.1-8B single-GPU peaks (README "Memory and training speed", batch 2 × 2048 packed).
``measured`` is torch.cuda.max_memory_allocated() in GiB (seed_recipe.py divides by 2**30).

    PYTHONPATH=src python bench/advise_vs_seed.py > bench/results/advise_vs_measured.json
"""

from __future__ import annotations

import json

from transformers import AutoConfig

from tunesmith.hardware import catalog
from tunesmith.hardware.memory import architecture_from_config, estimate_memory, lora_trainable_params

SEED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TORCHTUNE = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # q, v, output_proj + MLP

ROWS = [
    # source, run, measured GiB, method, micro-batch, gc, targets, r, dropout, precision of full FT
    ("seed recipe, H200", "lora --varlen", 21.2, "lora", 4, True, SEED, 16, 0.05, "bf16"),
    ("seed recipe, H200", "lora (fixed 2048)", 21.0, "lora", 4, True, SEED, 16, 0.05, "bf16"),
    ("seed recipe, H200", "lora --varlen --packing --liger", 20.8, "lora", 4, True, SEED, 16, 0.05, "bf16"),
    ("seed recipe, H200", "qlora (fixed 2048)", 10.2, "qlora", 4, True, SEED, 16, 0.05, "bf16"),
    ("seed recipe, H200", "qlora --varlen", 10.3, "qlora", 4, True, SEED, 16, 0.05, "bf16"),
    ("seed recipe, H200", "lora --varlen --no-gc", 83.5, "lora", 4, False, SEED, 16, 0.05, "bf16"),
    ("seed recipe, H200", "full --bs 1 --ga 16 (bf16 weights and AdamW states)", 63.6, "full", 1, True, SEED, 16,
     0.05, "bf16"),
    ("torchtune README, RTX 4090", "8B LoRA r8 (compile, AC, packed 2×2048)", 16.2, "lora", 2, True, TORCHTUNE, 8,
     0.0, "bf16"),
    ("torchtune README, RTX 4090", "8B QLoRA r8 (compile, AC, packed 2×2048)", 7.4, "qlora", 2, True, TORCHTUNE, 8,
     0.0, "bf16"),
]


def main() -> None:
    fields = catalog.config_dict(catalog.MODELS["llama-3.1-8b"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    arch = architecture_from_config(config, "llama-3.1-8b")
    out = []
    for source, run, measured, method, batch, gc, targets, r, dropout, precision in ROWS:
        trainable, adapted = lora_trainable_params(config, r, targets)
        est = estimate_memory(arch, method, batch, 2048, lora_r=r, lora_trainable=trainable,
                              adapted_in_features=adapted, lora_dropout=dropout,
                              checkpointing="full" if gc else "none", logits="fused", full_precision=precision)
        out.append({"source": source, "run": run, "measured_gib": measured, "estimate_gib": est.peak_allocated_gib,
                    "error_pct": round(100 * (est.peak_allocated_gib - measured) / measured, 1),
                    "estimate": est.to_dict()})
    print(json.dumps({"bench": "advise_vs_measured", "model": "llama-3.1-8b", "seq": 2048, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
