"""One LoRA adapter's first product with its input dropout, forward + backward, on one GPU: the fused kernels
(src/tunesmith/train/adapter_dropout_kernels.py) against PEFT's way (dropout, then the product), eager and compiled,
and against the product without dropout (the floor).

    python3 bench/adapter_dropout.py [--tokens 8192] [--json-out FILE]

Shapes of the 8B model's adapters: inputs of 4,096 features (q, k, v, o, gate, up) and 14,336 (down), rank 16,
p 0.05, bf16 autocast, fp32 adapter weights. Prints milliseconds per forward + backward (median of 30 after 5
warm-up calls), and the kernels' launch settings swept (rows per program, warps, Philox rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F


def _time(fn, reps: int = 30, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(cols: int, tokens: int, rank: int, p: float = 0.05) -> dict:
    """One adapter shape: the four ways side by side, then the kernels' launch settings."""
    from tunesmith.train import adapter_dropout as ad
    from tunesmith.train import adapter_dropout_kernels as k

    op = ad._dropout_linear_op()
    torch.manual_seed(0)
    x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(rank, cols, device="cuda") * 0.02).requires_grad_()
    g = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([1], device="cuda", dtype=torch.int64)

    def plain(drop: bool) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = F.linear(F.dropout(x, p, training=True) if drop else x, w)
        h.backward(g)

    def peft_fn(xx: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.linear(F.dropout(xx, p, training=True), ww)

    compiled = torch.compile(peft_fn)
    row = {"tokens": tokens, "features": cols, "rank": rank,
           "no_dropout_ms": _time(lambda: plain(False)), "peft_eager_ms": _time(lambda: plain(True)),
           "peft_compiled_ms": _time(lambda: compiled(x, w).backward(g)),
           "fused_ms": _time(lambda: op(x, w, seed, p).backward(g))}
    xd, wd = x.detach(), w.detach()
    defaults = (k.FORWARD_ROWS, k.FORWARD_WARPS, k.BACKWARD_ROWS, k.BACKWARD_WARPS, k.ROUNDS)
    sweep: dict[str, float | str] = {}

    def timed(name: str, fn) -> None:
        try:
            sweep[name] = round(_time(fn), 4)
        except Exception as exc:  # a launch setting this Triton cannot compile: recorded, not fatal
            sweep[name] = f"failed: {type(exc).__name__}"

    for k.FORWARD_ROWS, k.FORWARD_WARPS in [(32, 4), (64, 4), (32, 8), (64, 8), (128, 8)]:
        timed(f"forward rows {k.FORWARD_ROWS} warps {k.FORWARD_WARPS}", lambda: k.forward(xd, wd, seed, p))
    k.FORWARD_ROWS, k.FORWARD_WARPS = defaults[:2]
    for k.BACKWARD_ROWS, k.BACKWARD_WARPS in [(32, 4), (64, 4), (32, 8), (64, 8), (128, 8)]:
        timed(f"backward rows {k.BACKWARD_ROWS} warps {k.BACKWARD_WARPS}", lambda: k.backward(g, xd, wd, seed, p))
    k.BACKWARD_ROWS, k.BACKWARD_WARPS = defaults[2:4]
    for k.ROUNDS in (7, 10):
        timed(f"forward+backward rounds {k.ROUNDS}",
              lambda: (k.forward(xd, wd, seed, p), k.backward(g, xd, wd, seed, p)))
    k.ROUNDS = defaults[4]
    row["kernels_ms"] = sweep
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    rows = []
    for cols in (4096, 14336):
        rows.append(measure(cols, a.tokens, a.rank))
        print("RESULT", json.dumps(rows[-1]))
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump({"command": "python3 bench/adapter_dropout.py", "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
