"""The front door: `Engine.from_pretrained(...)`, then `generate`, `stream`, `chat`, `shutdown`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

from typing_extensions import Self

from chat_core.checkpoint.aliases import DEFAULT_MODEL
from chat_core.checkpoint.checkpoint import Checkpoint, open_checkpoint
from chat_core.engine.block_manager import PrefixCacheStats
from chat_core.engine.executor import Executor, LocalExecutor
from chat_core.engine.generator import Generator
from chat_core.engine.scheduler import SchedulerConfig
from chat_core.engine_config import EngineConfig
from chat_core.outputs import CompletionOutput, RequestOutput
from chat_core.sampling_params import SamplingParams

# A prompt: text, token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."}.
PromptInput = Union[str, list[int], dict[str, Any]]
Message = dict[str, Any]


@dataclass(frozen=True)
class StreamDelta:
    """What one step added to a streamed completion."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class DeltaCursor:
    """Turns the cumulative state of one completion into what is new since the last call."""

    def __init__(self) -> None:
        self._text = 0
        self._tokens = 0

    def advance(self, completion: CompletionOutput) -> StreamDelta:
        delta = StreamDelta(completion.text[self._text :], completion.token_ids[self._tokens :], completion.finish_reason)
        self._text, self._tokens = len(completion.text), len(completion.token_ids)
        return delta


class Engine:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, executor: Executor, tokenizer: Any | None) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.model_config = checkpoint.config
        self.executor = executor
        self.tokenizer = tokenizer
        eos_ids = tuple(tokenizer.stop_token_ids) if tokenizer is not None else ()
        self.generator = Generator(
            executor,
            tokenizer,
            scheduler_config=SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=config.resolve_max_model_len(self.model_config.max_position_embeddings),
            ),
            block_size=config.block_size,
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=tuple(dict.fromkeys(eos_ids + self.model_config.eos_token_ids)),
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self._request_ids = itertools.count()
        self._closed = False

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        **options: Any,
    ) -> Engine:
        """Load a model from a directory, a GGUF file or an alias (default: SmolLM2-135M-Instruct).

        `dtype` is that of the activations (and of dense weights): "auto" is bfloat16 on CUDA, float32 on
        the CPU. `options` are further `EngineConfig` fields (quantization, max_model_len, max_num_seqs,
        kv_cache_memory_gib, enable_prefix_caching, model_runner_cls, control_plane, ...).
        """
        config = EngineConfig(
            model=str(model),
            dtype=dtype,
            device=device,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            **options,
        )
        checkpoint = open_checkpoint(config.model)
        config = config.resolved_for(checkpoint)
        tokenizer = checkpoint.load_tokenizer()
        executor = create_executor(config, checkpoint)
        return cls(config, checkpoint, executor, tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.generator.max_model_len

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Tokens looked up in the prefix cache and found there, and blocks evicted from it, so far."""
        return self.generator.block_manager.stats

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use are kept); e.g. before timing a cold start."""
        self.generator.block_manager.reset_prefix_cache()

    # Prompts
    def encode_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text, token ids or a dict."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.encode_prompt(prompt["prompt"])
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.checkpoint.path} has no tokenizer files, so text prompts cannot be encoded; "
                    "pass token ids ({'prompt_token_ids': [...]}) instead"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string, a list of token ids or a dict; got {type(prompt).__name__}")

    def render_chat(self, messages: list[Message], **template_kwargs: Any) -> str:
        """The conversation as the model's chat template renders it, by default ending with the header of the
        assistant's turn; `add_generation_prompt=False`, `continue_final_message=True` (the model continues the
        last message) and template variables as in `Tokenizer.apply_chat_template`."""
        if self.tokenizer is None:
            raise ValueError(f"{self.checkpoint.path} has no tokenizer, so it has no chat template")
        return self.tokenizer.apply_chat_template(messages, **template_kwargs)

    def chat_prompt(self, messages: list[Message], **template_kwargs: Any) -> dict[str, Any]:
        """The prompt of a conversation: the chat template rendered and tokenized (it brings its own BOS)."""
        text = self.render_chat(messages, **template_kwargs)
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    # Generation
    def add_request(self, prompt: PromptInput, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        self._check_open()
        text, token_ids = self.encode_prompt(prompt)
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        self.generator.add_request(request_id, token_ids, params or SamplingParams(), prompt=text)
        return request_id

    def generate(
        self, prompts: PromptInput | Iterable[PromptInput], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Complete every prompt (batched together); outputs in the order of the prompts."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        order: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for prompt, prompt_params in zip(prompts, params_list):
                order.append(self.add_request(prompt, prompt_params))
            while len(finished) < len(order):
                for output in self.generator.step():
                    if output.finished:
                        finished[output.request_id] = output
        except BaseException:
            for request_id in order:
                self.generator.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in order]

    def stream(self, prompt: PromptInput, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield the new text (and token ids) of a single completion as it is generated."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() streams one completion; got n={params.n} (use generate())")
        request_id = self.add_request(prompt, params)
        cursor = DeltaCursor()
        try:
            while True:
                for output in self.generator.step():
                    if output.request_id != request_id:
                        continue
                    # Text may lag its tokens (an unfinished character, a possible stop string).
                    yield cursor.advance(output.outputs[0])
                    if output.finished:
                        return
        finally:
            self.generator.abort_request(request_id)  # a no-op when it finished; frees it when the caller stopped early

    def chat(self, messages: list[Message], params: SamplingParams | None = None, **template_kwargs: Any) -> RequestOutput:
        return self.generate([self.chat_prompt(messages, **template_kwargs)], params)[0]

    def stream_chat(
        self, messages: list[Message], params: SamplingParams | None = None, **template_kwargs: Any
    ) -> Iterator[StreamDelta]:
        return self.stream(self.chat_prompt(messages, **template_kwargs), params)

    def __repr__(self) -> str:  # what a notebook cell shows: the model and how it runs, in one line
        config = self.config
        runner = config.model_runner_cls
        runner_name = getattr(runner, "__qualname__", runner)  # a class, or its "module:Class" string
        parts = [
            f"model={config.model!r}",
            f"dtype={config.dtype!r}",
            f"device={config.device!r}",
            f"quantization={config.quantization!r}",
            f"tp={config.tensor_parallel_size}",  # the parallel layout, named as the CLI's --tp/--pp
            f"pp={config.pipeline_parallel_size}",
            *([f"model_runner_cls={runner_name}"] if runner is not None else []),
            *(["shut down"] if self._closed else []),
        ]
        return f"Engine({', '.join(parts)})"

    # Lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine has been shut down")

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.executor.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def create_executor(config: EngineConfig, checkpoint: Checkpoint) -> Executor:
    """A local executor for one rank; the distributed package's executor for more."""
    if config.world_size == 1:
        return LocalExecutor(config, checkpoint)
    try:
        from chat_distributed import create_distributed_executor
    except ImportError as exc:
        raise ImportError(
            f"tensor_parallel_size={config.tensor_parallel_size} and pipeline_parallel_size="
            f"{config.pipeline_parallel_size} need the chat-distributed package: pip install chat-distributed"
        ) from exc
    return create_distributed_executor(config, checkpoint)
