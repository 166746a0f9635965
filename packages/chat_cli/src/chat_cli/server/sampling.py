"""From a validated request to the engine's inputs: its prompts' token ids and its SamplingParams.

The limits a server adds on top of the engine's own checks live here: the served model's name,
`--max-tokens-limit`, and a prompt plus `max_tokens` that would not fit in the context.
"""

from __future__ import annotations

import re
from typing import Any

from chat_cli.server.errors import APIError, bad_request
from chat_cli.server.protocol import ChatCompletionRequest, CompletionRequest, RequestModel, SamplingRequest
from chat_cli.server.settings import ServerSettings
from chat_core import Engine, SamplingParams

EnginePrompt = dict[str, Any]  # {"prompt": text or None, "prompt_token_ids": [...]}, as Engine.encode_prompt reads it


def check_request(request: SamplingRequest, settings: ServerSettings) -> None:
    """Refuse a request for another model, one asking for what we do not implement, or too many completions."""
    if request.model is not None and request.model != settings.served_model_name:
        raise APIError(
            404,
            f"the model {request.model!r} does not exist here; this server serves {settings.served_model_name!r}",
            param="model",
            code="model_not_found",
        )
    refuse_unsupported(request)
    if request.n > settings.max_n:
        raise bad_request(
            f"n={request.n} is above this server's limit of {settings.max_n} completions per request (--max-n)", param="n"
        )


def refuse_unsupported(request: RequestModel) -> None:
    found = request.unsupported_field()
    if found is not None:
        name, value = found
        raise bad_request(
            f"'{name}' is not supported by this server (got {value!r}); leave it out", param=name, code="unsupported_parameter"
        )


def chat_prompt(engine: Engine, request: ChatCompletionRequest, settings: ServerSettings) -> EnginePrompt:
    """The conversation rendered with the model's chat template and tokenized."""
    if len(request.messages) > settings.max_messages:
        raise bad_request(
            f"the request has {len(request.messages)} messages, above this server's limit of {settings.max_messages} "
            "(--max-messages)",
            param="messages",
        )
    try:
        return engine.chat_prompt([m.as_template_message() for m in request.messages])
    except ValueError as exc:  # no tokenizer or template, or the template refused the conversation
        raise bad_request(f"the messages cannot be rendered with this model's chat template: {exc}", param="messages") from exc


def completion_prompts(engine: Engine, request: CompletionRequest, settings: ServerSettings) -> list[EnginePrompt]:
    texts_or_ids = request.prompts()
    if len(texts_or_ids) > settings.max_prompts:
        raise bad_request(
            f"the request has {len(texts_or_ids)} prompts, above this server's limit of {settings.max_prompts} per request",
            param="prompt",
        )
    prompts = []
    for prompt in texts_or_ids:
        try:
            text, token_ids = engine.encode_prompt(prompt)
        except (ValueError, TypeError) as exc:  # e.g. text for a model without a tokenizer
            raise bad_request(str(exc), param="prompt") from exc
        vocab_size = engine.model_config.vocab_size
        if outside := [t for t in token_ids if not 0 <= t < vocab_size]:
            raise bad_request(f"prompt token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})", param="prompt")
        prompts.append({"prompt": text, "prompt_token_ids": token_ids})
    return prompts


def sampling_params(
    request: SamplingRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompts: list[EnginePrompt],
    max_model_len: int,
    settings: ServerSettings,
    prompt_param: str,
) -> SamplingParams:
    """The request's SamplingParams, after the checks that need the prompts' lengths."""
    longest = max(len(p["prompt_token_ids"]) for p in prompts)
    if longest >= max_model_len:
        raise bad_request(
            f"the prompt has {longest} tokens, but this model's context holds {max_model_len} tokens in all; "
            "shorten it so at least one token can be generated",
            param=prompt_param,
            code="context_length_exceeded",
        )
    limit = settings.max_tokens_limit
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise bad_request(f"max_tokens={max_tokens} is above this server's limit of {limit} (--max-tokens-limit)", param="max_tokens")
    if max_tokens is not None and longest + max_tokens > max_model_len:
        raise bad_request(
            f"the prompt has {longest} tokens and max_tokens is {max_tokens}, but this model's context holds "
            f"{max_model_len} tokens in all; ask for at most {max_model_len - longest} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if max_tokens is None and limit is not None:
        max_tokens = min(limit, max_model_len - longest)
    chosen: dict[str, Any] = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
        "stop_token_ids": request.stop_token_ids,
    }
    try:
        return SamplingParams(
            n=request.n,
            seed=request.seed,
            max_tokens=max_tokens,
            stop=request.stop or (),
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            **{name: value for name, value in chosen.items() if value is not None},  # None: the engine's default
        )
    except ValueError as exc:  # "SamplingParams.<field>=... is invalid": the request's field of that name
        named = re.match(r"SamplingParams\.(\w+)=", str(exc))
        raise bad_request(str(exc), param=named.group(1) if named else None) from exc
