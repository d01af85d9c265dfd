"""Load test of `qstar serve` on loopback, and its hardening checks, for the current code and (`--before REV`) a
commit's, both servers running at once and every phase and load cell taken on one and then the other, so that a busy
machine's drift falls on both alike. Per server:

- throughput (emitted tokens/s over all clients) and time to the first token (p50, p95) under 1, 4 and 16 concurrent
  streaming clients, with and without thoughts, each client sending its share of max(--requests, clients);
- the resident set (VmRSS of /proc/PID/status) after a warm-up at the largest batch and after every 50 of
  --rss-requests short requests;
- a request with one 20,000-character stop string while a stream flows: its status and seconds, and the longest gap
  between the stream's tokens while it was answered beside the stream's median gap;
- presence_penalty and frequency_penalty: the status;
- the worker thread killed (SIGUSR1: the launcher raises an exception in it, as a bug escaping its loop would):
  /health's status and a new request's status and seconds.

Bounded: fixed request counts, each with a timeout; the servers are started here on 127.0.0.1 and stopped at the end.
The 'before' is `git archive REV qstar cli` unpacked into a temporary directory (removed at the end) and served from
there.

    python benchmarks/serve_load.py [--model CKPT] [--backend torch] [--threads N] [--before REV] [--requests 8]
        [--max-tokens 16] [--rss-requests 200] [--publish NAME]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "weights" / "arith-llama"
TOY_PROMPTS = ["2:dje=", "0:mpg=", "7:abc=", "3:xyz="]
TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a", "Q: What is 12 times 7?\nA:"]
CLIENTS = (1, 4, 16)
STOP_CHARS = 20_000
TIMEOUT_S = 300
DEAD_TIMEOUT_S = 10
"""How long a request to a server whose worker is dead may wait for an answer."""

LAUNCH = """
import ctypes, signal, sys, threading
import qstar
qstar.__path__.append(sys.argv.pop(1))
from qstar.cli.main import app

class WorkerKilled(BaseException):
    def __str__(self):
        return "killed by SIGUSR1 from benchmarks/serve_load.py"

def kill(signum, frame):
    worker = next(t for t in threading.enumerate() if t.name == "qstar-batcher")
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(WorkerKilled))

signal.signal(signal.SIGUSR1, kill)
sys.argv[0] = "qstar"
app()
"""
"""`qstar serve` from a source tree (argv[1], also the cwd and PYTHONPATH): its cli/ made qstar.cli (an editable
install maps qstar.cli to the install's own cli/ whatever PYTHONPATH says), and SIGUSR1 raising an exception in the
worker thread that nothing in qstar catches but the worker loop's last resort, as a bug escaping the loop would."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(tree: Path, args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """`qstar serve` from `tree` on a free port: its URL and process id, stopped on exit."""
    port = free_port()
    model = str(Path(args.model).resolve())
    command = [sys.executable, "-c", LAUNCH, str(tree), "serve", "--model", model, "--backend", args.backend]
    command += ["--port", str(port), "--max-batch", "16", "--max-queue", "64"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, cwd=tree, env=env, stderr=subprocess.DEVNULL)  # -c puts the cwd first
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(3000):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None:
                    raise SystemExit(f"qstar serve from {tree} did not start: run it by hand to see why") from None
                time.sleep(0.1)
        else:
            raise SystemExit("qstar serve did not answer within 300 s")
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def source_tree(rev: str) -> Iterator[Path]:
    """The package's source (qstar/, cli/) at commit `rev`, in a temporary directory."""
    archive = subprocess.run(["git", "archive", rev, "qstar", "cli"], cwd=ROOT, capture_output=True, check=True)
    with tempfile.TemporaryDirectory(prefix="serve-before-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp)
        yield Path(tmp)


def rss_mb(pid: int) -> float:
    """The process's resident set (VmRSS) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


class Client:
    """Requests to one server, with the model's name and the prompts."""

    def __init__(self, url: str, name: str, prompts: list[str]) -> None:
        self.url, self.name, self.prompts = url, name, prompts

    def body(self, seed: int, max_tokens: int, thoughts: bool, **fields: Any) -> dict[str, Any]:
        prompt = self.prompts[seed % len(self.prompts)]
        body = {"model": self.name, "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "temperature": 1.0}
        return body | {"thoughts": thoughts, **fields}

    def stream(self, body: dict[str, Any], times: list[float] | None = None) -> tuple[float, list[float], int]:
        """A streamed completion: when it was sent, when each chunk came (appended to `times` as they come), and
        the tokens emitted."""
        body = body | {"stream": True, "stream_options": {"include_usage": True}}
        sent, tokens, times = time.perf_counter(), 0, [] if times is None else times
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=TIMEOUT_S) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices"):
                    times.append(time.perf_counter())
        return sent, times, tokens

    def post(self, body: dict[str, Any], timeout: float = TIMEOUT_S) -> dict[str, Any]:
        """A whole completion: status, seconds and the error's type and message (or a timeout)."""
        tic = time.perf_counter()
        try:
            response = httpx.post(self.url + "/v1/completions", json=body, timeout=timeout)
        except httpx.TimeoutException:
            return {"status": None, "seconds": time.perf_counter() - tic, "error": f"no answer in {timeout} s"}
        out: dict[str, Any] = {"status": response.status_code, "seconds": time.perf_counter() - tic}
        if response.status_code != 200:
            error = response.json().get("error", {})
            out |= {"error_type": error.get("type"), "error": error.get("message")}
        return out

    def load(self, clients: int, requests: int, max_tokens: int, thoughts: bool) -> dict[str, Any]:
        """`requests` streamed completions from `clients` threads at once: throughput and time to first token."""
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
                    sent, times, n = self.stream(self.body(seed, max_tokens, thoughts))
                    ttft.append(times[0] - sent if times else float("nan"))
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


def huge_stop(client: Client) -> dict[str, Any]:
    """A request with one 20,000-character stop string, sent once a stream without thoughts flows: its answer, and
    the stream's longest gap between tokens while it was answered beside the stream's median gap."""
    flowing: list[float] = []
    thread = threading.Thread(target=client.stream, args=(client.body(1, 128, False), flowing))
    thread.start()
    while len(flowing) < 4 and thread.is_alive():
        time.sleep(0.01)
    sent = time.perf_counter()
    answer = client.post(client.body(2, 8, False, stop="x" * STOP_CHARS))
    answered = time.perf_counter()
    thread.join()
    gaps = np.diff(flowing)
    during = [b - a for a, b in pairwise(flowing) if b >= sent and a <= answered]
    return answer | {
        "stream_tokens": len(flowing),
        "stream_median_gap_s": float(np.median(gaps)) if len(gaps) else float("nan"),
        "stream_max_gap_during_s": max(during, default=float("nan")),
        "stream_flowing_throughout": bool(flowing) and flowing[-1] > answered,
    }


def dead_worker(client: Client, pid: int) -> dict[str, Any]:
    """The worker thread killed: /health's status within a few seconds, then a new request's answer."""
    os.kill(pid, signal.SIGUSR1)
    tic = time.perf_counter()
    health = httpx.get(client.url + "/health", timeout=5)
    while health.status_code == 200 and time.perf_counter() - tic < 5:
        time.sleep(0.1)
        health = httpx.get(client.url + "/health", timeout=5)
    request = client.post(client.body(3, 4, True), timeout=DEAD_TIMEOUT_S)
    return {"health_status": health.status_code, "health": health.json(), "request": request}


@dataclass
class Served:
    """A running server: which code, its client and its process."""

    code: str
    commit: str
    client: Client
    pid: int


def memory(server: Served, requests: int, every: int = 50) -> dict[str, Any]:
    """The server's resident set after the warm-up and after every `every` of `requests` short requests (2 tokens,
    with thoughts, 16 clients)."""
    readings, failed = [rss_mb(server.pid)], 0
    for done in range(0, requests, every):
        failed += server.client.load(16, min(every, requests - done), 2, True)["failed"]
        readings.append(rss_mb(server.pid))
    growth = readings[-1] / readings[0] - 1
    print(f"{server.code}: RSS {' -> '.join(f'{r:.0f}' for r in readings)} MB ({100 * growth:+.1f}%)", flush=True)
    return {
        "after_warmup_mb": readings[0],
        "after_requests_mb": readings[-1],
        "readings_mb": readings,
        "every": every,
        "requests": requests,
        "failed": failed,
        "growth": growth,
    }


def checks(server: Served) -> dict[str, Any]:
    """The huge stop string beside a stream, the penalties, then the worker killed (the server is of no use after)."""
    client = server.client
    stop = huge_stop(client)
    print(f"{server.code}: 20,000-character stop string: {json.dumps(stop)}", flush=True)
    penalties = client.post(client.body(4, 4, True, presence_penalty=0.6, frequency_penalty=0.4))
    print(f"{server.code}: presence_penalty and frequency_penalty: {json.dumps(penalties)}", flush=True)
    dead = dead_worker(client, server.pid)
    print(f"{server.code}: worker killed: {json.dumps(dead)}", flush=True)
    return {"huge_stop": stop, "penalties": penalties, "dead_worker": dead}


def measure(servers: list[Served], args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every measurement, each phase and load cell on every server in turn, so that the machine's drift falls on
    them alike: the load cells' rows, and per server its memory and checks."""
    for server in servers:  # warm-up at the largest batch, both paths
        for thoughts in (True, False):
            server.client.load(16, 16, 4, thoughts)
    results: dict[str, Any] = {s.code: {"commit": s.commit, "memory": memory(s, args.rss_requests)} for s in servers}
    rows = []
    print("code    clients  thoughts  requests  tokens/s  TTFT p50  TTFT p95  failed", flush=True)
    for thoughts in (True, False):
        for clients in CLIENTS:
            for server in servers:
                r = server.client.load(clients, max(args.requests, clients), args.max_tokens, thoughts)
                rows.append({"code": server.code, "commit": server.commit, **r})
                print(
                    f"{server.code:6}  {clients:7d}  {str(thoughts):8}  {r['requests']:8d}  {r['tokens_per_s']:8.2f}  "
                    f"{r['ttft_p50_s']:7.3f}s  {r['ttft_p95_s']:7.3f}s  {r['failed']:6d}",
                    flush=True,
                )
    for server in servers:
        results[server.code] |= checks(server)
    return rows, results


def git(*command: str) -> str:
    return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--threads", type=int, help="the server's CPU threads (qstar serve --threads)")
    parser.add_argument("--before", help="also measure the server at this commit")
    parser.add_argument(
        "--requests", type=int, default=8, help="requests a (clients, thoughts) cell, one a client at least"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rss-requests", type=int, default=200, help="short requests after the warm-up's RSS reading")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable) [default: text, or the toy's]")
    parser.add_argument(
        "--publish", metavar="NAME", help="record benchmarks/results/NAME.json and write its docs table"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tables import publish, record, render

    prompts = args.prompt or (TOY_PROMPTS if Path(args.model).resolve() == DEFAULT_MODEL else TEXT_PROMPTS)
    tic, servers = time.perf_counter(), []
    with ExitStack() as stack:
        codes = [("before", git("rev-parse", "--short", args.before))] if args.before else []
        for code, commit in [*codes, ("after", git("rev-parse", "--short", "HEAD"))]:
            tree = stack.enter_context(source_tree(commit)) if code == "before" else ROOT
            url, pid = stack.enter_context(serving(tree, args))
            print(f"{code} ({commit}): qstar serve from {tree}, pid {pid}", flush=True)
            servers.append(Served(code, commit, Client(url, Path(args.model).name, prompts), pid))
        rows, results = measure(servers, args)
    for code in results:
        for thoughts in (True, False):
            one, sixteen = (
                next(r for r in rows if (r["code"], r["clients"], r["thoughts"]) == (code, c, thoughts))
                for c in (1, 16)
            )
            ratio = sixteen["tokens_per_s"] / one["tokens_per_s"]
            print(f"{code}, thoughts={thoughts}: 16 clients' throughput / 1 client's = {ratio:.2f}")
    meta = {"model": Path(args.model).name, "backend": args.backend, "threads": args.threads, "prompts": prompts}
    meta |= {"requests": args.requests, "max_tokens": args.max_tokens, "rss_requests": args.rss_requests}
    meta |= {"servers": results, "seconds": time.perf_counter() - tic}
    command = "python benchmarks/serve_load.py " + shlex.join(sys.argv[1:])
    print(render("serve", {"command": command, "date": "-", "machine": "-", **meta, "rows": rows}))
    if args.publish:
        record(args.publish, rows, command, **meta)
        publish(args.publish)


if __name__ == "__main__":
    main()
