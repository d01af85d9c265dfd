"""`qstar serve` against careless and hostile clients, in process (FastAPI's TestClient over the tiny Llama, torch):
stop strings within limits, a worker that died reported at once, the API key compared in constant time, the fields
OpenAI's clients send (penalties and logit_bias applied), failures typed server_error, a chat template's refusal as a
400, and prompts measured before they are templated and tokenized off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import require

require("fastapi", "uvicorn", "httpx")

from fastapi.testclient import TestClient  # noqa: E402

import qstar  # noqa: E402
from qstar.core.serving import openai_api  # noqa: E402
from qstar.core.serving.batcher import Batcher  # noqa: E402
from qstar.core.serving.openai_api import Server, build_app  # noqa: E402

NAME = "tiny"
KEY = "secret-key"
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['content'] }}\n{% endfor %}"
)
"""A chat template that refuses roles that do not alternate, as Llama-2's and Mistral's do."""


@pytest.fixture(scope="module")
def model(llama_checkpoint) -> qstar.QStarModel:
    return qstar.load(str(llama_checkpoint), backend="torch", thought_tokens=2)


@dataclass
class Running:
    server: Server
    client: TestClient

    @property
    def batcher(self) -> Batcher:
        return self.server.batcher


@contextmanager
def serving(model: qstar.QStarModel, api_key: str | None = None, start: bool = True) -> Iterator[Running]:
    """A server over `model` and a client of it; its worker started unless `start` is false."""
    batcher = Batcher(model, max_batch=4, max_queue=8)
    server = Server(model, NAME, batcher, False, api_key)
    if start:
        batcher.start()
    with TestClient(build_app(server), raise_server_exceptions=False) as client:
        yield Running(server, client)
    if batcher.worker.is_alive():
        batcher.close()


@pytest.fixture
def server(model: qstar.QStarModel) -> Iterator[Running]:
    with serving(model) as running:
        yield running


def completion(server: Running, **fields: Any) -> Any:
    return server.client.post("/v1/completions", json={"model": NAME, "prompt": "abc", "max_tokens": 4, **fields})


def chat(server: Running, messages: list[dict[str, str]], **fields: Any) -> Any:
    return server.client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, **fields})


def refused(response: Any, status: int, *words: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """The OpenAI error shape with this status and type, its message holding `words`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and all(w in error["message"] for w in words), error
    return error


def test_stop_strings_are_limited_and_a_huge_one_is_refused_while_a_stream_flows(server):
    refused(completion(server, stop=["a", "b", "c", "d", "e"]), 400, "at most 4 stop strings")
    refused(completion(server, stop="x" * 257), 400, "of at most 256 characters")
    assert completion(server, stop=["a", "b", "c", "x" * 256]).status_code == 200
    lines: list[str] = []

    def stream() -> None:
        body = {"model": NAME, "prompt": "abc", "max_tokens": 150, "stream": True, "thoughts": False}
        with server.client.stream("POST", "/v1/completions", json=body) as response:
            lines.extend(line for line in response.iter_lines() if line.startswith("data:"))

    flowing = threading.Thread(target=stream)
    flowing.start()
    while not lines:
        time.sleep(0.01)
    tic = time.perf_counter()
    refused(completion(server, stop="x" * 20_000), 400, "at most 256 characters")
    assert time.perf_counter() - tic < 5
    flowing.join()
    assert lines[-1] == "data: [DONE]" and len(lines) > 2


def test_a_dead_worker_fails_health_and_new_requests_at_once(model):
    with serving(model, start=False) as server:

        def broken(block: bool) -> None:
            raise RuntimeError("the worker broke")

        server.batcher.admit = broken  # type: ignore[method-assign]
        server.batcher.start()
        server.batcher.worker.join(timeout=30)
        refused(server.client.get("/health"), 503, "the worker broke", kind="server_error")
        tic = time.perf_counter()
        error = refused(completion(server), 503, "restart the server", kind="server_error")
        assert error["code"] == "worker_stopped" and time.perf_counter() - tic < 5


def test_requests_waiting_when_the_worker_dies_end_with_its_error(model):
    with serving(model, start=False) as server:
        batcher, real = server.batcher, server.batcher.admit

        def breaks_on_a_request(block: bool) -> None:
            if not batcher.waiting.empty():
                raise RuntimeError("the worker broke")
            real(False)
            time.sleep(0.01)

        batcher.admit = breaks_on_a_request  # type: ignore[method-assign]
        batcher.start()
        refused(completion(server), 500, "generation failed: RuntimeError: the worker broke", kind="server_error")
        refused(server.client.get("/health"), 503, "the worker broke", kind="server_error")


def test_the_api_key_is_compared_in_constant_time(model, monkeypatch):
    compared = []

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(openai_api.hmac, "compare_digest", compare_digest)
    with serving(model, api_key=KEY) as server:
        assert server.client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        for header in (f"Bearer {KEY[:-1]}x", "Bearer ключ".encode(), b""):
            response = server.client.get("/v1/models", headers={"Authorization": header})
            refused(response, 401, "a valid API key is needed", kind="authentication_error")
        assert server.client.get("/health").status_code == 200  # no key needed
    assert len(compared) == 4 and all(b == f"Bearer {KEY}".encode() for _, b in compared)


def test_the_fields_openai_clients_send_are_accepted_and_penalties_applied(server, model):
    ignored = {"user": "u1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto"}
    ignored |= {"safety_identifier": "s", "prompt_cache_key": "k"}
    asked = {"presence_penalty": 0.8, "frequency_penalty": 1.2, "logit_bias": {"70": 2.5, "71": -100}}
    reply = completion(server, max_tokens=8, temperature=0.9, seed=4, **asked, **ignored)
    assert reply.status_code == 200, reply.text
    alone = model.generate(
        "abc", 8, temperature=0.9, seed=[4], presence_penalty=0.8, frequency_penalty=1.2, logit_bias={70: 2.5, 71: -100}
    )[0]
    assert reply.json()["choices"][0]["text"] == alone.text
    plain = completion(server, max_tokens=8, temperature=0.9, seed=4).json()["choices"][0]["text"]
    assert plain == model.generate("abc", 8, temperature=0.9, seed=[4])[0].text != alone.text
    forced = chat(
        server, [{"role": "user", "content": "x"}], max_tokens=3, logit_bias={"70": 100}, parallel_tool_calls=False
    )
    assert forced.json()["choices"][0]["message"]["content"] == model.decode([70] * 3)
    refused(completion(server, logit_bias={"128": 1}), 400, "outside the vocabulary [0, 128)")
    refused(completion(server, logit_bias={"7": 101}), 400, "logit_bias.7")
    refused(completion(server, logit_bias={"seven": 1}), 400, "token ids")
    refused(completion(server, presence_penalty=2.5), 400, "presence_penalty")
    refused(completion(server, frobnicate=1), 400, "frobnicate")


def test_failures_are_server_errors_in_the_openai_shape(server, monkeypatch):
    def fails(*args: object) -> None:
        raise RuntimeError("something broke")

    monkeypatch.setattr(server.batcher.batches[True], "step", fails)
    error = refused(completion(server), 500, "generation failed: RuntimeError: something broke", kind="server_error")
    assert error["code"] == "generation_failed"
    monkeypatch.setattr(server.server, "prompt", fails)
    refused(completion(server), 500, "RuntimeError: something broke", kind="server_error")


def test_a_chat_templates_own_refusal_is_a_400(server, model, monkeypatch):
    monkeypatch.setattr(model.tokenizer, "chat_template", ALTERNATING)
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    error = refused(chat(server, twice, max_tokens=2), 400, "Conversation roles must alternate")
    assert error["param"] == "messages"
    assert chat(server, twice[:1], max_tokens=2).status_code == 200


def test_prompts_are_measured_first_and_tokenized_off_the_event_loop(server, model, monkeypatch):
    calls: list[bool] = []
    real = model.chat_ids

    def chat_ids(messages: list[dict[str, str]]) -> list[int]:
        try:
            asyncio.get_running_loop()
            calls.append(True)
        except RuntimeError:  # no event loop runs in this thread
            calls.append(False)
        return real(messages)

    monkeypatch.setattr(model, "chat_ids", chat_ids)
    assert chat(server, [{"role": "user", "content": "abc"}], max_tokens=2).status_code == 200
    assert calls == [False]
    long = "a" * (server.server.max_chars + 1)
    error = refused(chat(server, [{"role": "user", "content": long}]), 400, f"{len(long)} characters", "1024 tokens")
    assert error["code"] == "context_length_exceeded" and calls == [False]  # refused before templating
    response = server.client.post("/v1/completions", content=b" " * (server.server.max_body + 1))
    refused(response, 413, f"over {server.server.max_body} bytes")
