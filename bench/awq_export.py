"""AWQ export on a GPU machine: quantize (W4A16, group 128, llm-compressor), reload, compare; print one JSON line.

    python bench/awq_export.py                       # builds its own small Llama (no hub) and exports it
    python bench/awq_export.py --model merged/       # a merged model folder from `tunesmith merge`

Needs a CUDA GPU and llm-compressor (+ compressed-tensors, datasets). With no --model, the model is a randomly
initialised Llama of AWQ-compatible width (every Linear input a multiple of 128) with the local byte-fallback BPE
tokenizer: the numbers then measure the quantization pipeline (does it load, how far do logits move), not the
quality of a trained model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.errors import TunesmithError
from tunesmith.export.awq import to_awq
from tunesmith.local_model import TINY_CORPUS, LocalModelShape, build_model

SHAPE = LocalModelShape(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=512)
"""Small enough to build in a second, wide enough for 128-channel groups (512 = 4 x 128, 1536 = 12 x 128)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="merged model folder (default: build a small random Llama)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tunesmith-awq"), help="work folder")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--json-out", type=Path, help="also write the JSON result here")
    args = parser.parse_args()

    import torch

    started = time.perf_counter()
    model_dir = args.model or build_model(args.out / "source", list(TINY_CORPUS) * 20, shape=SHAPE, seed=0,
                                          vocab_size=SHAPE.vocab_size)
    built = time.perf_counter()
    try:
        result = to_awq(model_dir, args.out / "awq", num_calibration_samples=args.samples)
    except TunesmithError as exc:
        sys.exit(f"error: {exc}")
    done = time.perf_counter()
    payload = {
        "bench": "awq_export",
        "model": str(args.model) if args.model else f"random Llama {SHAPE}",
        **result.to_dict(),
        "seconds": {"build": round(built - started, 2), "quantize_and_check": round(done - built, 2)},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "transformers", "llmcompressor",
                                                       "compressed-tensors", "datasets")},
    }
    line = json.dumps(payload)
    print(line)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
