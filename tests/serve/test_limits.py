"""`gptkit serve` at its limits: the API key, a full queue, bad requests (OpenAI-shaped 4xx, and the
server goes on serving), a model without a chat template, and the address it binds."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from servers import KEY, Server

from gptkit.serve.server import exposed

PROTECTED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/metrics", None),
]


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_without_the_key_every_protected_route_is_401(strict: Server, method: str, path: str, body) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, f"{strict.url}{path}", json=body, headers=headers)
        assert openai_error(r, 401)["code"] == "invalid_api_key"
    r = httpx.request(method, f"{strict.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code != 401, r.text


def test_health_needs_no_key(strict: Server) -> None:
    assert httpx.get(f"{strict.url}/health").json() == {"status": "ok"}


def test_a_model_without_a_chat_template_gets_400_for_chat(strict: Server) -> None:
    body = {"model": strict.model_id, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{strict.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert "no chat template" in openai_error(r, 400)["message"]


def test_a_full_queue_answers_429_and_waiting_streams_get_keep_alives(strict: Server) -> None:
    """One row, one place in the queue: A decodes, B waits (with keep-alive comments), C is refused."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": strict.model_id, "prompt": "abc", "max_tokens": 1000, "temperature": 0, "stream": True}
    seen_b: list[str] = []
    with httpx.Client(timeout=30, headers=headers) as client:
        with client.stream("POST", f"{strict.url}/v1/completions", json=body) as a:
            a_lines = a.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(a_lines).startswith("data: ")  # A has its slot

            def wait_b() -> None:
                with client.stream("POST", f"{strict.url}/v1/completions", json=body) as b:
                    for line in b.iter_lines():
                        seen_b.append(line)
                        if line.startswith("data: "):
                            break

            waiter = threading.Thread(target=wait_b)
            waiter.start()
            deadline = time.monotonic() + 10
            while not any(line.startswith(": keep-alive") for line in seen_b):
                assert time.monotonic() < deadline, f"no keep-alive while queued: {seen_b}"
                time.sleep(0.05)
            c = client.post(f"{strict.url}/v1/completions", json={**body, "stream": False})
            error = openai_error(c, 429)
            assert error["type"] == "rate_limit_error" and int(c.headers["Retry-After"]) >= 1
        waiter.join(timeout=30)  # A left: B got its slot
    assert seen_b[-1].startswith("data: ")


BAD = [
    ("malformed JSON", b'{"model": "base", "prompt": ', 400, None),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("temperature -1", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("wrong type", {"prompt": "hi", "n": "many"}, 400, "n"),
    ("too many samples", {"prompt": "hi", "n": 99}, 400, "n"),
    ("prompt longer than the context", {"prompt": "x" * 1100}, 400, "prompt"),
    ("max_tokens past the context", {"prompt": "hi", "max_tokens": 1023}, 400, "max_tokens"),
    ("20 MB body", {"prompt": "x" * 20_000_000}, 413, None),
    ("unknown model", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_shaped_errors_and_the_server_goes_on(
    server: Server, case: str, body, status: int, param: str | None
) -> None:
    url = f"{server.url}/v1/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(url, json={"model": server.model_id, **body}, timeout=60)
    error = openai_error(r, status)
    if param is not None:
        assert error["param"] == param, error
    assert "\n" not in error["message"]
    ok = httpx.post(url, json={"model": server.model_id, "prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 3


def test_unknown_fields_are_ignored(server: Server) -> None:
    body = {"model": server.model_id, "prompt": "hi", "max_tokens": 2, "user": "me", "suffix_x": 1}
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200


def test_only_unspecified_addresses_count_as_exposed() -> None:
    assert exposed("0.0.0.0") and exposed("::") and not exposed("127.0.0.1") and not exposed("localhost")
