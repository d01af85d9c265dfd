"""Load test of `qstar serve` on loopback: 1, 4 and 16 concurrent streaming clients, each sending its share of a fixed
number of requests; throughput (emitted tokens/s over all clients) and latency to the first token (p50, p95), with
and without thoughts. Bounded: a fixed count of requests, each with a timeout; the server is started here on
127.0.0.1 and stopped at the end.

    python benchmarks/serve_load.py [--model CKPT] [--backend torch] [--requests 32] [--max-tokens 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "weights" / "arith-llama"
PROMPTS = ["2:dje=", "0:mpg=", "7:abc=", "3:xyz="]


def start(model: str, backend: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "qstar", "serve", "--model", model, "--backend", backend, "--port", str(port)]
    process = subprocess.Popen([*command, "--max-batch", "16", "--max-queue", "64"], stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return process
        except httpx.TransportError:
            if process.poll() is not None:
                raise SystemExit("qstar serve did not start: run it by hand to see why") from None
            time.sleep(0.1)
    raise SystemExit("qstar serve did not answer within 120 s")


def one_request(url: str, name: str, seed: int, max_tokens: int, thoughts: bool) -> tuple[float, int]:
    """Seconds to the first token and tokens emitted, for one streamed completion."""
    body = {"model": name, "prompt": PROMPTS[seed % len(PROMPTS)], "max_tokens": max_tokens, "stream": True}
    body |= {"seed": seed, "temperature": 1.0, "thoughts": thoughts, "stream_options": {"include_usage": True}}
    tic, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - tic
    return first or 0.0, tokens


def run(url: str, name: str, clients: int, requests: int, max_tokens: int, thoughts: bool) -> dict[str, float]:
    ttft: list[float] = []
    tokens: list[int] = []
    failed: list[str] = []
    seeds = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                seed = next(seeds, None)
            if seed is None:
                return
            try:
                first, n = one_request(url, name, seed, max_tokens, thoughts)
                ttft.append(first)
                tokens.append(n)
            except httpx.HTTPError as err:
                failed.append(str(err))

    tic = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - tic
    return {
        "clients": clients,
        "thoughts": thoughts,
        "requests": requests,
        "failed": len(failed),
        "tokens_per_s": sum(tokens) / seconds,
        "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else float("nan"),
        "ttft_p95_s": float(np.percentile(ttft, 95)) if ttft else float("nan"),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--requests", type=int, default=32, help="requests per (clients, thoughts) cell")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, name = f"http://127.0.0.1:{port}", Path(args.model).name
    server = start(args.model, args.backend, port)
    rows = []
    try:
        run(url, name, 1, 2, 4, True)  # warm-up
        print("clients  thoughts  tokens/s  TTFT p50  TTFT p95  failed")
        for thoughts in (True, False):
            for clients in (1, 4, 16):
                r = run(url, name, clients, args.requests, args.max_tokens, thoughts)
                rows.append(r)
                print(
                    f"{clients:7d}  {str(thoughts):8}  {r['tokens_per_s']:8.1f}  {r['ttft_p50_s']:7.3f}s  "
                    f"{r['ttft_p95_s']:7.3f}s  {r['failed']:6d}"
                )
    finally:
        server.terminate()
        server.wait(timeout=30)
    for thoughts in (True, False):
        one, sixteen = (next(r for r in rows if r["clients"] == c and r["thoughts"] == thoughts) for c in (1, 16))
        ratio = sixteen["tokens_per_s"] / one["tokens_per_s"]
        print(f"thoughts={thoughts}: 16 clients' throughput / 1 client's = {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "backend": args.backend, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
