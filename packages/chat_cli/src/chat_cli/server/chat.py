"""POST /v1/chat/completions: a conversation through the model's chat template, answered whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chat_cli.server.body import read_request
from chat_cli.server.errors import APIError, bad_request
from chat_cli.server.logprobs import chat_logprobs
from chat_cli.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    Usage,
)
from chat_cli.server.request_group import RequestGroup, run_until_disconnected
from chat_cli.server.sampling import chat_prompt, check_request, sampling_params
from chat_cli.server.state import new_response_id, server_state
from chat_cli.server.streaming import DONE, DeltaTracker, EventStreamResponse, event


async def create_chat_completion(request: Request) -> Response:
    state = server_state(request)
    body = await read_request(request, ChatCompletionRequest, state.settings.max_body_bytes)
    check_request(body, state.settings)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request(f"top_logprobs={body.top_logprobs} needs logprobs=true", param="top_logprobs")
    prompt = chat_prompt(state.engine, body, state.settings)
    params = sampling_params(
        body,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        prompts=[prompt],
        max_model_len=state.engine.max_model_len,
        settings=state.settings,
        prompt_param="messages",
    )
    response_id, created = new_response_id("chatcmpl")
    group = state.new_group([prompt], params, response_id)
    model = state.settings.served_model_name
    if body.stream:
        await run_until_disconnected(request, group.start())
        return EventStreamResponse(_events(group, body, response_id, created, model), cleanup=group.aclose)
    [output] = await run_until_disconnected(request, group.results())
    choices = [
        ChatChoice(
            index=completion.index,
            message=AssistantMessage(content=completion.text),
            logprobs=chat_logprobs(completion.logprobs, completion.top_logprobs) if body.logprobs else None,
            finish_reason=completion.finish_reason,
        )
        for completion in output.outputs
    ]
    usage = Usage.of(output.num_prompt_tokens, output.num_completion_tokens, output.num_cached_tokens)
    response = ChatCompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage)
    return JSONResponse(response.model_dump(mode="json"))


async def _events(
    group: RequestGroup, body: ChatCompletionRequest, response_id: str, created: int, model: str
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return event(ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, usage=usage))

    tracker = DeltaTracker(body.n)
    try:
        # OpenAI's first chunk of each choice carries the role and no text.
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(body.n)])
        try:
            async for prompt_index, output in group.updates():
                for delta in tracker.deltas(prompt_index, output):
                    logprobs = chat_logprobs(delta.logprobs, delta.top_logprobs) if body.logprobs else None
                    content = DeltaMessage(content=delta.text) if delta.text else DeltaMessage()
                    yield chunk(
                        [ChatChunkChoice(index=delta.index, delta=content, logprobs=logprobs, finish_reason=delta.finish_reason)]
                    )
        except APIError as exc:  # the status line is gone; the error travels as an event, as OpenAI's does
            yield event(exc.body())
            yield DONE
            return
        if body.include_usage_in_stream:
            yield chunk([], Usage.of(group.num_prompt_tokens, tracker.num_completion_tokens(), tracker.num_cached_tokens()))
        yield DONE
    finally:
        await group.aclose()
