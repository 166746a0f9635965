"""The wire format: OpenAI's request and response bodies for models, completions and chat completions.

Requests ignore fields they do not know (official clients send `user`, `store`, `metadata`, ...).
Fields we know but do not implement are declared, so that a non-default value can be refused by
name (`unsupported_field`) instead of being silently ignored.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from chat_core.sampling_params import MAX_LOGPROBS

FinishReason = Literal["stop", "length", "abort"]


class RequestModel(BaseModel):
    # strict: "0.5" is not a temperature and true is not an n (JSON ints still pass as floats)
    model_config = ConfigDict(extra="ignore", strict=True)

    # field -> the values that mean "not used"; anything else is refused with a 400
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def unsupported_field(self) -> tuple[str, Any] | None:
        """The first field set to a value this server does not implement, with that value."""
        for name, defaults in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in defaults:
                return name, value
        return None


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingRequest(RequestModel):
    """The fields chat and text completions share."""

    model: str | None = None  # optional: there is one served model
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions (the official client sends them through extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings_are_not_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and any(not s for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must not be empty")
        return stop

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# Requests: chat completions


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"tool_calls": (None, [])}

    def as_template_message(self) -> dict[str, str]:
        """What the chat template sees: a role it knows and the text."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}),
        "logit_bias": (None, {}),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "prediction": (None,),
    }

    def unsupported_field(self) -> tuple[str, Any] | None:
        for index, message in enumerate(self.messages):
            found = message.unsupported_field()
            if found is not None:
                return f"messages[{index}].{found[0]}", found[1]
        return super().unsupported_field()


# Requests: text completions

PromptField = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Any  # checked below: the union's own errors would name its four members, not the problem
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "echo": (False,),
        "suffix": (None, ""),
        "logit_bias": (None, {}),
    }

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> PromptField:
        def is_ids(value: Any) -> bool:
            return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)

        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt) or is_ids(prompt) or all(is_ids(p) for p in prompt):
                return prompt
        raise ValueError(
            "expected a string, a list of strings, a list of token ids, or a list of token-id lists (none of them empty)"
        )

    def unsupported_field(self) -> tuple[str, Any] | None:
        if self.best_of not in (None, self.n):  # best_of == n is plain sampling
            return "best_of", self.best_of
        return super().unsupported_field()

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per entry: a text or a list of token ids."""
        if isinstance(self.prompt, str) or type(self.prompt[0]) is int:
            return [self.prompt]
        return list(self.prompt)


# Responses


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Fields left out of the JSON when they are None, as OpenAI leaves them out (a stream chunk has no "usage", a
    # delta names only what it carries). A serializer rather than `Field(exclude_if=...)`: that needs pydantic 2.12.
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self.OMITTED_WHEN_NONE:
            if isinstance(data, dict) and name in data and data[name] is None:
                del data[name]
        return data


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "chat-cli"
    max_model_len: int


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(ResponseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(ResponseModel):
    content: list[TokenLogprob]
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(ResponseModel):
    OMITTED_WHEN_NONE = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    OMITTED_WHEN_NONE = ("usage",)

    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    OMITTED_WHEN_NONE = ("usage",)  # in stream chunks, as OpenAI does

    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorBody(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorBody
