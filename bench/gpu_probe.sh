#!/usr/bin/env bash
# First look at the GPU machine: versions, the fast path's numerics tests, the seed stack on a tiny model, and
# tunesmith's 8B variants (LoRA, then QLoRA). Run from the staged folder with PYTHONPATH set (see fast_engine.py).
set -uo pipefail
python3 - <<'PY'
import inspect, importlib.metadata as md, torch
for p in ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel",
          "pydantic", "triton", "pyarrow", "fsspec", "typing_extensions"]:
    try: print(p, md.version(p))
    except Exception as e: print(p, "MISSING", e)
from torch.nn.attention.varlen import varlen_attn
print("varlen_attn", inspect.signature(varlen_attn))
print(torch.cuda.get_device_name(0), torch.cuda.mem_get_info())
import liger_kernel.transformers.functional, bitsandbytes, trl, datasets
print("imports ok")
PY
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -25
for m in lora qlora; do timeout 120 python3 bench/seed_recipe.py --shape tiny --method $m --varlen --steps 2 \
  --workdir /tmp/seedtiny 2>&1 | grep -E "RESULT|Error|error" | tail -3; done
