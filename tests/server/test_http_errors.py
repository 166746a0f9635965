"""Every refusal of a real server: its status and OpenAI's error body, naming the bad value and what was expected."""

from __future__ import annotations

import httpx
import openai
import pytest

from server_process import SMOLLM2_MAX_BODY_BYTES, SMOLLM2_MAX_MODEL_LEN, SMOLLM2_MAX_TOKENS_LIMIT, SMOLLM2_NAME

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "hello"}]


def assert_error(
    response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None, mentions: tuple[str, ...] = ()
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                             405: "invalid_request_error", 413: "invalid_request_error"}[status]  # fmt: skip
    assert error["param"] == param and (code is None or error["code"] == code), error
    for text in mentions:
        assert text in error["message"], (text, error["message"])
    return error


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


@pytest.mark.parametrize(
    "content, code, mentions",
    [
        (b'{"messages": [', "invalid_json", ("not valid JSON",)),
        (b"", "invalid_json", ("empty",)),
        (b"[1, 2]", None, ("expected an object", "[1, 2]")),
    ],
)
def test_a_body_that_is_not_a_json_object(smollm2_server, content, code, mentions):
    response = post(smollm2_server, CHAT, content=content, headers={"Content-Type": "application/json"})
    assert_error(response, 400, code=code, mentions=mentions)


CHAT_CASES = [
    ({}, "messages", ("'messages' is required",)),
    ({"messages": "hello"}, "messages", ("expected a valid array", "'hello'")),
    ({"messages": []}, "messages", ("at least 1 item",)),
    (
        {"messages": [{"role": "robot", "content": "hi"}]},
        "messages[0].role",
        ("'system', 'developer', 'user' or 'assistant'", "'robot'"),
    ),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role", ("'tool'",)),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
        ("'text'",),
    ),
    ({"messages": HELLO, "temperature": -1}, "temperature", ("greater than or equal to 0", "-1")),
    ({"messages": HELLO, "temperature": "hot"}, "temperature", ("valid number", "'hot'")),
    ({"messages": HELLO, "top_p": 0}, "top_p", ("greater than 0",)),
    ({"messages": HELLO, "n": 0}, "n", ("greater than or equal to 1",)),
    ({"messages": HELLO, "n": 99}, "n", ("n=99", "limit of 16")),
    ({"messages": HELLO, "presence_penalty": 3}, "presence_penalty", ("less than or equal to 2",)),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", ("greater than or equal to 1", "0")),
    ({"messages": HELLO, "max_completion_tokens": 1.5}, "max_completion_tokens", ("valid integer", "1.5")),
    ({"messages": HELLO, "stop": 5}, "stop", ("valid string or a valid array", "5")),
    ({"messages": HELLO, "stop": [""]}, "stop", ("stop strings must not be empty",)),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs", ("less than or equal to 20",)),
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs", ("needs logprobs=true",)),
    ({"messages": HELLO, "stream": "yes"}, "stream", ("valid boolean", "'yes'")),
    (
        {"messages": HELLO, "max_tokens": SMOLLM2_MAX_TOKENS_LIMIT + 1},
        "max_tokens",
        (f"max_tokens={SMOLLM2_MAX_TOKENS_LIMIT + 1}", f"limit of {SMOLLM2_MAX_TOKENS_LIMIT}"),
    ),
]


@pytest.mark.parametrize("body, param, mentions", CHAT_CASES, ids=[c[1] for c in CHAT_CASES])
def test_an_invalid_chat_request(smollm2_server, body, param, mentions):
    assert_error(post(smollm2_server, CHAT, json=body), 400, param=param, mentions=mentions)


COMPLETION_CASES = [
    ({}, "prompt", ("'prompt' is required",)),
    ({"prompt": []}, "prompt", ("a list of token ids", "[]")),
    ({"prompt": ["a", 1]}, "prompt", ("a list of strings", "['a', 1]")),
    ({"prompt": "hi", "logprobs": 21}, "logprobs", ("less than or equal to 20",)),
    ({"prompt": [1, 2, 10**9]}, "prompt", ("1000000000", "outside the vocabulary")),
    ({"prompt": "hi", "seed": 2**64}, "seed", ("seed=18446744073709551616",)),
]


@pytest.mark.parametrize("body, param, mentions", COMPLETION_CASES, ids=[str(c[0]) for c in COMPLETION_CASES])
def test_an_invalid_completion_request(smollm2_server, body, param, mentions):
    assert_error(post(smollm2_server, COMPLETIONS, json=body), 400, param=param, mentions=mentions)


UNSUPPORTED = [
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"tool_choice": "required"}, "tool_choice"),
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"logit_bias": {"50256": -100}}, "logit_bias"),
    (COMPLETIONS, {"best_of": 3}, "best_of"),
    (COMPLETIONS, {"echo": True}, "echo"),
    (COMPLETIONS, {"suffix": "the end"}, "suffix"),
]


@pytest.mark.parametrize("path, field, name", UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_a_field_we_do_not_implement_is_refused_by_name(smollm2_server, path, field, name):
    body = {"messages": HELLO} if path == CHAT else {"prompt": "hello"}
    assert_error(
        post(smollm2_server, path, json={**body, **field}),
        400,
        param=name,
        code="unsupported_parameter",
        mentions=(f"'{name}' is not supported",),
    )


def test_fields_at_their_defaults_and_unknown_fields_are_accepted(smollm2_server):
    body = {
        "messages": HELLO, "max_tokens": 1, "tools": [], "response_format": {"type": "text"}, "logit_bias": {},
        "user": "someone", "store": False, "metadata": {"a": "b"}, "parallel_tool_calls": True, "service_tier": "auto",
    }  # fmt: skip
    assert post(smollm2_server, CHAT, json=body).status_code == 200
    assert (
        post(smollm2_server, COMPLETIONS, json={"prompt": "hi", "max_tokens": 1, "best_of": 1, "echo": False}).status_code == 200
    )


def test_a_prompt_longer_than_the_context(smollm2_server):
    long_text = "word " * (SMOLLM2_MAX_MODEL_LEN + 10)
    error = assert_error(
        post(smollm2_server, CHAT, json={"messages": [{"role": "user", "content": long_text}]}),
        400, param="messages", code="context_length_exceeded", mentions=(f"holds {SMOLLM2_MAX_MODEL_LEN} tokens",),
    )  # fmt: skip
    assert "the prompt has" in error["message"]
    assert_error(
        post(smollm2_server, COMPLETIONS, json={"prompt": long_text}), 400, param="prompt", code="context_length_exceeded"
    )
    assert_error(
        post(smollm2_server, COMPLETIONS, json={"prompt": [1] * SMOLLM2_MAX_MODEL_LEN, "stream": True}),
        400, param="prompt", code="context_length_exceeded",
    )  # fmt: skip


def test_a_prompt_and_max_tokens_that_do_not_fit_together(smollm2_server):
    prompt = [1] * (SMOLLM2_MAX_MODEL_LEN - 100)
    assert_error(
        post(smollm2_server, COMPLETIONS, json={"prompt": prompt, "max_tokens": 101}),
        400, param="max_tokens", code="context_length_exceeded", mentions=("at most 100 tokens",),
    )  # fmt: skip


def test_an_unknown_model_is_404(smollm2_server):
    response = post(smollm2_server, CHAT, json={"model": "gpt-4o", "messages": HELLO})
    assert_error(response, 404, param="model", code="model_not_found", mentions=("'gpt-4o'", f"'{SMOLLM2_NAME}'"))
    with pytest.raises(openai.NotFoundError) as caught:
        smollm2_server.client().completions.create(model="nope", prompt="hi")
    assert caught.value.code == "model_not_found"


def test_unknown_routes_and_methods_answer_in_the_same_format(smollm2_server):
    assert_error(httpx.get(f"{smollm2_server.url}/v1/nothing-here"), 404, mentions=("/v1/nothing-here",))
    assert_error(httpx.get(f"{smollm2_server.url}{CHAT}"), 405, mentions=("Method Not Allowed",))


def test_a_body_above_the_limit_is_413(smollm2_server):
    big = {"messages": [{"role": "user", "content": "x" * SMOLLM2_MAX_BODY_BYTES}]}
    assert_error(post(smollm2_server, CHAT, json=big), 413, code="request_too_large", mentions=(str(SMOLLM2_MAX_BODY_BYTES),))

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(SMOLLM2_MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    assert_error(post(smollm2_server, CHAT, content=chunks()), 413, code="request_too_large")
    assert post(smollm2_server, CHAT, json={"messages": HELLO, "max_tokens": 1}).status_code == 200  # still serving


def test_the_official_client_raises_its_typed_errors(smollm2_server):
    client = smollm2_server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SMOLLM2_NAME, messages=HELLO, temperature=-1)
    assert caught.value.param == "temperature" and "-1" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=SMOLLM2_NAME, messages=HELLO, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    assert caught.value.code == "unsupported_parameter"


def test_the_api_key_is_required_when_set(tiny_server):
    url = f"{tiny_server.url}/v1/models"
    assert_error(httpx.get(url), 401, code="invalid_api_key", mentions=("Authorization: Bearer",))
    assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    assert_error(httpx.post(f"{tiny_server.url}{CHAT}", json={"messages": HELLO}), 401, code="invalid_api_key")
    assert httpx.get(url, headers={"Authorization": f"Bearer {tiny_server.api_key}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert tiny_server.client().models.list().data[0].id == tiny_server.model
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{tiny_server.url}/metrics").status_code == 200
