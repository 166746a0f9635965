"""chat-core: Llama-family models, checkpoints, tokenizers, sampling and the abstract engine.

    from chat_core import Engine, SamplingParams
    with Engine.from_pretrained("smollm2-135m-instruct") as engine:
        print(engine.generate("The capital of France is", SamplingParams(max_tokens=20))[0].text)
"""

from chat_core.checkpoint.aliases import DEFAULT_MODEL, MODEL_ALIASES
from chat_core.checkpoint.checkpoint import Checkpoint, open_checkpoint
from chat_core.checkpoint.errors import CheckpointError
from chat_core.config import ModelConfig, UnsupportedModelError
from chat_core.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from chat_core.engine.engine import Engine, StreamDelta
from chat_core.engine.execute_model_request import ExecuteModelRequest, ScheduledSequence
from chat_core.engine.executor import Executor, LocalExecutor
from chat_core.engine.generator import Generator, PromptTooLongError
from chat_core.engine_config import EngineConfig
from chat_core.outputs import CompletionOutput, IntermediateOutput, Logprob, RequestOutput, SamplerOutput
from chat_core.sampling_params import SamplingParams
from chat_core.worker.model_runner import LlamaModelInput, LlamaModelRunner
from chat_core.worker.model_runner_base import ModelInput, ModelRunnerBase
from chat_core.worker.worker import Worker
from chat_core.worker.worker_base import WorkerBase, WorkerInput

__version__ = "0.1.0"  # the package's only version number: pyproject.toml reads it

__all__ = [
    "AsyncEngine",
    "DEFAULT_MODEL",
    "EngineDeadError",
    "EngineOverloadedError",
    "MODEL_ALIASES",
    "Checkpoint",
    "CheckpointError",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "ExecuteModelRequest",
    "Executor",
    "Generator",
    "IntermediateOutput",
    "LlamaModelInput",
    "LlamaModelRunner",
    "LocalExecutor",
    "Logprob",
    "ModelConfig",
    "ModelInput",
    "ModelRunnerBase",
    "PromptTooLongError",
    "RequestOutput",
    "SamplerOutput",
    "SamplingParams",
    "ScheduledSequence",
    "StreamDelta",
    "UnsupportedModelError",
    "Worker",
    "WorkerBase",
    "WorkerInput",
    "open_checkpoint",
]
