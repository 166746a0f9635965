"""POST /v1/completions: raw prompts (text or token ids, one or several), answered whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chat_cli.server.body import read_request
from chat_cli.server.errors import APIError
from chat_cli.server.logprobs import completion_logprobs
from chat_cli.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from chat_cli.server.request_group import RequestGroup, run_until_disconnected
from chat_cli.server.sampling import check_request, completion_prompts, sampling_params
from chat_cli.server.state import new_response_id, server_state
from chat_cli.server.streaming import DONE, DeltaTracker, EventStreamResponse, event


async def create_completion(request: Request) -> Response:
    state = server_state(request)
    body = await read_request(request, CompletionRequest, state.settings.max_body_bytes)
    check_request(body, state.settings)
    prompts = completion_prompts(state.engine, body, state.settings)
    params = sampling_params(
        body,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        prompts=prompts,
        max_model_len=state.engine.max_model_len,
        settings=state.settings,
        prompt_param="prompt",
    )
    response_id, created = new_response_id("cmpl")
    group = state.new_group(prompts, params, response_id)
    model = state.settings.served_model_name
    if body.stream:
        await run_until_disconnected(request, group.start())
        return EventStreamResponse(_events(group, body, response_id, created, model), cleanup=group.aclose)
    outputs = await run_until_disconnected(request, group.results())
    choices = [
        CompletionChoice(
            index=prompt_index * body.n + completion.index,
            text=completion.text,
            logprobs=completion_logprobs(completion.logprobs, completion.top_logprobs, 0) if body.logprobs is not None else None,
            finish_reason=completion.finish_reason,
        )
        for prompt_index, output in enumerate(outputs)
        for completion in output.outputs
    ]
    usage = Usage.of(
        group.num_prompt_tokens,
        sum(output.num_completion_tokens for output in outputs),
        sum(output.num_cached_tokens for output in outputs),
    )
    response = CompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage)
    return JSONResponse(response.model_dump(mode="json"))


async def _events(group: RequestGroup, body: CompletionRequest, response_id: str, created: int, model: str) -> AsyncIterator[str]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return event(CompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage))

    tracker = DeltaTracker(body.n)
    try:
        try:
            async for prompt_index, output in group.updates():
                for delta in tracker.deltas(prompt_index, output):
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = completion_logprobs(delta.logprobs, delta.top_logprobs, delta.text_offset)
                    choice = CompletionChoice(
                        index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
                    )
                    yield chunk([choice])
        except APIError as exc:  # the status line is gone; the error travels as an event, as OpenAI's does
            yield event(exc.body())
            yield DONE
            return
        if body.include_usage_in_stream:
            yield chunk([], Usage.of(group.num_prompt_tokens, tracker.num_completion_tokens(), tracker.num_cached_tokens()))
        yield DONE
    finally:
        await group.aclose()
