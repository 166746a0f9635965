"""Security defaults: the API key (whole, from the environment), CORS off unless origins are given, bounded
requests, and a warning when the server listens beyond this machine without a key."""

from __future__ import annotations

import httpx
import pytest

from chat_cli.main import build_parser
from chat_cli.server import ServerSettings, build_app
from chat_core import Engine
from chat_core.engine.async_engine import AsyncEngine
from server_process import serve_in_thread, start_server, stop_server

KEY = "s3cret-key"
ORIGIN = "https://app.example.com"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def async_engine(tiny_chat_model):
    async_engine = AsyncEngine(Engine.from_pretrained(tiny_chat_model), driver="thread")
    yield async_engine
    async_engine.shutdown()


@pytest.fixture
def serve(async_engine):
    """serve(**settings) -> the URL of an app with those ServerSettings, on the module's tiny engine."""
    stack = []

    def start(**settings) -> str:
        serving = serve_in_thread(build_app(async_engine, ServerSettings(served_model_name="tiny", **settings)))
        stack.append(serving)
        return serving.__enter__()

    yield start
    for serving in stack:
        serving.__exit__(None, None, None)


def assert_openai_error(response: httpx.Response, status: int, **expected: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert {name: error[name] for name in expected} == expected, error
    return error


def test_only_the_whole_key_is_accepted(serve):
    url = serve(api_key=KEY)
    for wrong in ("s3cret", KEY + "x", KEY.upper(), "x" * len(KEY), f"{KEY} {KEY}"):
        response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        assert_openai_error(response, 401, code="invalid_api_key")
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    # The key never comes back, not even in an error.
    response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer nope"}, json={"messages": HELLO})
    assert KEY not in response.text and "nope" not in response.text


def test_the_key_is_read_from_the_environment_so_it_stays_out_of_ps(monkeypatch):
    monkeypatch.setenv("CHAT_API_KEY", KEY)
    assert build_parser().parse_args(["serve"]).api_key == KEY
    monkeypatch.delenv("CHAT_API_KEY")
    assert build_parser().parse_args(["serve"]).api_key is None


def test_cors_is_off_by_default(serve):
    url = serve()
    response = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = httpx.options(
        f"{url}/v1/chat/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert_openai_error(preflight, 405)


def test_cors_allows_only_the_origins_given(serve):
    url = serve(api_key=KEY, allowed_origins=(ORIGIN,))
    preflight = httpx.options(
        f"{url}/v1/chat/completions",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{url}/v1/models", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers  # the browser keeps the answer from that page
    refused = httpx.options(
        f"{url}/v1/chat/completions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in refused.headers
    assert assert_openai_error(refused, 400)["message"] == "CORS preflight refused: origin not allowed"


@pytest.mark.parametrize("text", ["app.example.com", "ftp://x", "https://a.example,"])
def test_an_origin_that_is_not_one_is_a_usage_error(text, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--allowed-origins", text])
    assert exited.value.code == 2 and "expected origins like https://app.example.com" in capsys.readouterr().err


def test_requests_are_bounded_by_the_settings(serve):
    url = serve(max_n=2, max_messages=3, max_prompts=2, max_tokens_limit=4, max_body_bytes=2000)
    chat, completions = f"{url}/v1/chat/completions", f"{url}/v1/completions"
    error = assert_openai_error(httpx.post(chat, json={"messages": HELLO * 4}), 400, param="messages")
    assert "4 messages" in error["message"] and "limit of 3" in error["message"]
    assert httpx.post(chat, json={"messages": HELLO * 3, "max_tokens": 1}).status_code == 200
    assert_openai_error(httpx.post(chat, json={"messages": HELLO, "n": 3}), 400, param="n")
    assert_openai_error(httpx.post(chat, json={"messages": HELLO, "max_tokens": 5}), 400, param="max_tokens")
    error = assert_openai_error(httpx.post(completions, json={"prompt": ["a", "b", "c"]}), 400, param="prompt")
    assert "3 prompts" in error["message"] and "limit of 2" in error["message"]
    assert httpx.post(completions, json={"prompt": ["a", "b"], "n": 2, "max_tokens": 1}).status_code == 200
    assert_openai_error(httpx.post(chat, json={"messages": [{"role": "user", "content": "x" * 2000}]}), 413)
    # Without max_tokens the answer stops at the limit, not at the end of the context.
    answer = httpx.post(chat, json={"messages": HELLO, "ignore_eos": True}).json()
    assert answer["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("bad", [{"max_messages": 0}, {"max_n": -1}, {"max_prompts": 1.5}, {"allowed_origins": "*"}])
def test_settings_refuse_bounds_that_are_not_bounds(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServerSettings(served_model_name="tiny", **bad)


def test_listening_beyond_this_machine_without_a_key_warns(tiny_chat_model, tmp_path):
    server = start_server("--model", tiny_chat_model, "--host", "0.0.0.0", log_dir=str(tmp_path), env={"CHAT_API_KEY": ""})
    try:
        assert httpx.get(server.url.replace("0.0.0.0", "127.0.0.1") + "/health").status_code == 200
    finally:
        assert stop_server(server.process) == 0
    assert "warning: serving on 0.0.0.0 without an API key" in server.log()


def test_an_early_refusal_of_a_large_body_is_read_not_reset(serve):
    """A 401 sent before the body is read: the server reads the body first, so the client gets the answer
    (closing with unread data would reset the connection) and can send its next request on the same connection."""
    url = serve(api_key=KEY, max_body_bytes=4 << 20)
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    with httpx.Client(base_url=url, timeout=60) as client:
        for connection in ("close", "keep-alive", "keep-alive"):
            refused = client.post(
                "/v1/chat/completions",
                content=body,
                # A client that sends its body without waiting for the 100 it asks for (httpx, curl after 1 s).
                headers={"Authorization": "Bearer wrong", "Connection": connection, "Expect": "100-continue"},
            )
            assert_openai_error(refused, 401, code="invalid_api_key")
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
