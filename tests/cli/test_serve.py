"""`qstar serve` with the real `openai` client, on a free loopback port, the shipped model, both backends: chat and
completions, streaming equal to the whole answer, thoughts equal to `qstar generate`'s for the same seed, stop
strings, usage; then hostile clients (bad requests, 50 that hang up mid-stream, a flood over the queue's bound), after
which the server still answers and holds no more memory than before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import backend_params, free_port, require

httpx = require("httpx")
openai = require("openai")
require("fastapi", "uvicorn")

from typer.testing import CliRunner  # noqa: E402

from qstar.cli.main import app  # noqa: E402
from qstar.weights import DEFAULT_MODEL  # noqa: E402

KEY = "test-key"
NAME = "arith-llama"
MAX_BATCH, MAX_QUEUE = 4, 8


class Running:
    def __init__(self, process: subprocess.Popen, port: int) -> None:
        self.process, self.url = process, f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, headers=headers, timeout=60, **kwargs)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024

    def idle(self) -> None:
        """Wait until no row decodes and no request waits."""
        for _ in range(200):
            health = httpx.get(self.url + "/health", timeout=10).json()
            if health["active_rows"] == 0 and health["waiting"] == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"the server stayed busy: {health}")


@pytest.fixture(scope="module", params=backend_params("torch", "mlx"))
def server(request: pytest.FixtureRequest) -> Iterator[Running]:
    port = free_port()
    command = [sys.executable, "-m", "qstar", "serve", "--model", str(DEFAULT_MODEL), "--backend", request.param]
    command += ["--port", str(port), "--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read()
                time.sleep(0.1)
        yield Running(process, port)
    finally:
        process.terminate()
        process.wait(timeout=30)


def generate_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["generate", "--model", str(DEFAULT_MODEL), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[-1])


def test_chat_thoughts_are_what_qstar_generate_shows(server):
    reply = server.client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "2:dje="}],
        max_tokens=6,
        temperature=0.7,
        seed=5,
        extra_body={"reasoning": True},
    )
    shown = generate_json("--prompt", "2:dje=", "--max-tokens", "6", "--temperature", "0.7", "--seed", "5")
    choice = reply.choices[0]
    assert choice.message.content == shown["text"]
    thoughts = [t["thought"] for t in shown["tokens"]]
    assert choice.qstar["thoughts"] == thoughts
    assert choice.message.reasoning_content == "".join(t + "\n" for t in thoughts)
    assert len(choice.qstar["mixing_weights"]) == len(thoughts)
    usage = reply.usage
    assert usage.completion_tokens == len(thoughts) and usage.prompt_tokens == shown["prompt_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.thought_tokens == 4 * len(thoughts)  # the shipped model's recipe: 4 thought tokens
    assert choice.finish_reason == {"max_tokens": "length", "eos": "stop", "stop": "stop"}[shown["stop"]]


@pytest.mark.parametrize("reasoning", [True, False])
def test_streamed_deltas_add_up_to_the_whole_answer(server, reasoning):
    asked = dict(model=NAME, messages=[{"role": "user", "content": "0:mpg="}], max_tokens=8, temperature=1.0, seed=3)
    whole = server.client.chat.completions.create(**asked, extra_body={"reasoning": reasoning})
    chunks = list(
        server.client.chat.completions.create(
            **asked, stream=True, stream_options={"include_usage": True}, extra_body={"reasoning": reasoning}
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    thinking = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert thinking == (whole.choices[0].message.reasoning_content if reasoning else "")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stop_n_logprobs_and_no_thoughts(server):
    free = server.client.completions.create(model=NAME, prompt="2:dje=", max_tokens=6, temperature=0, seed=1)
    text = free.choices[0].text
    assert len(text) >= 2
    cut = server.client.completions.create(
        model=NAME, prompt="2:dje=", max_tokens=6, temperature=0, seed=1, stop=[text[1]]
    )
    assert cut.choices[0].text == text.split(text[1])[0] and cut.choices[0].finish_reason == "stop"
    several = server.client.completions.create(
        model=NAME, prompt="2:dje=", max_tokens=3, temperature=1.0, seed=7, n=3, logprobs=2
    )
    assert [c.index for c in several.choices] == [0, 1, 2]
    for choice in several.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
        assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    plain = server.client.completions.create(
        model=NAME, prompt="2:dje=", max_tokens=3, temperature=0, extra_body={"thoughts": False}
    )
    assert plain.usage.thought_tokens == 0
    shown = generate_json("--prompt", "2:dje=", "--max-tokens", "3", "--no-thoughts")
    assert plain.choices[0].text == shown["text"]


def test_models_health_and_the_api_key(server):
    assert [m.id for m in server.client.models.list()] == [NAME]
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    anonymous = httpx.get(server.url + "/v1/models")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


BAD = {
    "malformed JSON": b'{"model": "arith-llama", "messages": [',
    "not UTF-8": b'{"model": "\xff\xfe", "messages": []}',
    "unknown field": {"model": NAME, "messages": [{"role": "user", "content": "1"}], "frobnicate": 1},
    "wrong type": {"model": NAME, "messages": [{"role": "user", "content": "1"}], "max_tokens": "5"},
    "negative max_tokens": {"model": NAME, "messages": [{"role": "user", "content": "1"}], "max_tokens": -1},
    "huge max_tokens": {"model": NAME, "messages": [{"role": "user", "content": "1"}], "max_tokens": 10**12},
    "prompt over the context": {"model": NAME, "messages": [{"role": "user", "content": "1=" * 400}]},
    "unknown model": {"model": "gpt-5", "messages": [{"role": "user", "content": "1"}]},
    "no messages": {"model": NAME, "messages": []},
    "bad role": {"model": NAME, "messages": [{"role": "robot", "content": "1"}]},
    "n over the batch": {"model": NAME, "messages": [{"role": "user", "content": "1"}], "n": 16},
    "token id outside the vocabulary": {"model": NAME, "prompt": [10**9]},
}


def test_every_bad_request_is_a_4xx_in_the_openai_error_shape(server):
    for what, body in BAD.items():
        path = "/v1/completions" if "prompt" in str(body) and isinstance(body, dict) else "/v1/chat/completions"
        if isinstance(body, bytes):
            response = server.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = server.post(path, json=body)
        assert 400 <= response.status_code < 500, (what, response.status_code, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], what
    ok = server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "1"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def hang_up_mid_stream(server: Running, seed: int) -> None:
    body = {"model": NAME, "prompt": "2:dje=", "max_tokens": 400, "stream": True, "seed": seed}
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    return  # leaves with the first token: the connection closes
    except httpx.HTTPError:
        return


def test_fifty_clients_hang_up_then_a_normal_request_succeeds(server):
    warm = server.client.completions.create(model=NAME, prompt="2:dje=", max_tokens=50, temperature=0)
    assert warm.choices[0].text
    before = server.rss_mb()
    for round_ in range(5):  # 50 clients, 10 at once (the queue's bound is 8 waiting + 4 decoding)
        threads = [threading.Thread(target=hang_up_mid_stream, args=(server, 10 * round_ + i)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    server.idle()  # every slot freed
    after = server.client.completions.create(model=NAME, prompt="2:dje=", max_tokens=50, temperature=0)
    assert after.choices[0].text == warm.choices[0].text
    assert server.rss_mb() <= 1.1 * before, (before, server.rss_mb())


def test_a_flood_over_the_bound_gets_429_with_retry_after_and_the_rest_succeed(server):
    statuses: list[int] = []
    retry: list[str | None] = []

    def ask(seed: int) -> None:
        body = {"model": NAME, "prompt": "2:dje=", "max_tokens": 30, "seed": seed, "temperature": 1.0}
        response = server.post("/v1/completions", json=body)
        statuses.append(response.status_code)
        if response.status_code != 200:
            retry.append(response.headers.get("retry-after"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3 * (MAX_BATCH + MAX_QUEUE))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= MAX_BATCH + MAX_QUEUE and statuses.count(429) >= 1
    assert all(r is not None and int(r) >= 1 for r in retry)
    server.idle()


def test_serve_without_fastapi_says_what_to_install(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    (tmp_path / "fastapi.py").write_text("raise ImportError('no fastapi here')\n")
    done = subprocess.run(
        [sys.executable, "-m", "qstar", "serve", "--model", str(DEFAULT_MODEL)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1 and "pip install 'qstar-lm[serve]'" in done.stderr


@pytest.mark.parametrize(
    ("host", "key", "warned"),
    [("0.0.0.0", None, True), ("192.168.1.5", None, True), ("0.0.0.0", KEY, False)]
    + [(host, None, False) for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2")],
)
def test_a_server_open_to_the_network_without_a_key_warns(monkeypatch, host, key, warned):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    monkeypatch.delenv("QSTAR_API_KEY", raising=False)
    args = ["serve", "--model", str(DEFAULT_MODEL), "--backend", "torch", "--host", host]
    result = CliRunner().invoke(app, args + ([] if key is None else ["--api-key", key]))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == (
        [f"warning: --host {host} opens the server to the network without --api-key: anyone can use it"]
        if warned
        else []
    )
