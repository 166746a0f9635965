"""chat-cli generate and chat, run as real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

from chat_core import Engine, SamplingParams


def chat_cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "chat_cli", *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_generate_prints_what_the_engine_generates_and_the_timing(tiny_chat_model):
    result = chat_cli("generate", "--model", tiny_chat_model, "--temperature", "0", "--max-tokens", "12", "hello world")
    assert result.returncode == 0, result.stderr
    with Engine.from_pretrained(tiny_chat_model) as engine:
        expected = engine.generate("hello world", SamplingParams(temperature=0, max_tokens=12))[0].text
    assert result.stdout == expected + "\n"
    assert "time to first token" in result.stderr and "tokens/s" in result.stderr


def test_generate_with_the_default_model():
    result = chat_cli("generate", "--chat-template", "--temperature", "0", "--max-tokens", "12", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_keeps_the_conversation_and_resets(tiny_chat_model):
    turns = ["hello there", "what is the capital", "/reset", "hello there", "/exit", "never read"]
    result = chat_cli(
        "chat", "--model", tiny_chat_model, "--temperature", "0", "--max-tokens", "6", "--system", "be brief", stdin="\n".join(turns) + "\n"
    )
    assert result.returncode == 0, result.stderr
    params = SamplingParams(temperature=0, max_tokens=6)
    with Engine.from_pretrained(tiny_chat_model) as engine:
        history = [{"role": "system", "content": "be brief"}]
        answers = []
        for turn in ("hello there", "what is the capital"):
            history.append({"role": "user", "content": turn})
            answers.append(engine.chat(history, params).text)
            history.append({"role": "assistant", "content": answers[-1]})
    lines = result.stdout.split("\n")
    assert lines[0] == answers[0] and lines[1] == answers[1]
    assert lines[2] == "[conversation cleared]"
    assert lines[3] == answers[0]  # after /reset the first turn is answered as the first time
    assert len([line for line in lines if line]) == 4  # /exit stopped before the last line


def test_a_missing_model_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    result = chat_cli("generate", "--model", missing, "hi")
    assert result.returncode == 2
    assert missing in result.stderr and "Traceback" not in result.stderr


def test_quantize_and_enforce_eager_reach_the_engine(tiny_chat_model):
    result = chat_cli(
        "generate", "--model", tiny_chat_model, "--quantize", "int4", "--group-size", "32", "--enforce-eager",
        "--temperature", "0", "--max-tokens", "8", "hello world",
    )
    assert result.returncode == 0, result.stderr
    with Engine.from_pretrained(tiny_chat_model, quantization="int4", quantization_group_size=32) as engine:
        expected = engine.generate("hello world", SamplingParams(temperature=0, max_tokens=8))[0].text
    assert result.stdout == expected + "\n"
    bad = chat_cli("generate", "--model", tiny_chat_model, "--quantize", "int3", "hello")
    assert bad.returncode != 0 and "int3" in bad.stderr


def test_compile_runs_compiled_decode_steps_with_the_eager_answer(tiny_chat_model):
    result = chat_cli("generate", "--model", tiny_chat_model, "--compile", "--temperature", "0", "--max-tokens", "8", "hello world")
    assert result.returncode == 0, result.stderr
    assert "stay eager" not in result.stderr  # the compile worked: no fallback warning
    with Engine.from_pretrained(tiny_chat_model) as engine:
        expected = engine.generate("hello world", SamplingParams(temperature=0, max_tokens=8))[0].text
    assert result.stdout == expected + "\n"


def test_prefix_caching_is_on_unless_turned_off():
    from chat_cli.main import build_parser
    from chat_cli.options import engine_kwargs

    for command in ("generate", "chat", "serve"):
        assert engine_kwargs(build_parser().parse_args([command]))["enable_prefix_caching"] is True
        assert engine_kwargs(build_parser().parse_args([command, "--no-prefix-caching"]))["enable_prefix_caching"] is False


def test_every_command_takes_a_kv_cache_dtype():
    from chat_cli.main import build_parser
    from chat_cli.options import engine_kwargs

    for command in ("generate", "chat", "serve"):
        assert engine_kwargs(build_parser().parse_args([command]))["kv_cache_dtype"] == "auto"
        assert engine_kwargs(build_parser().parse_args([command, "--kv-cache-dtype", "bfloat16"]))["kv_cache_dtype"] == "bfloat16"


def test_options_that_cannot_work_are_refused_before_the_model_loads(tmp_path):
    """Sampling values, option pairs and ports: a one-line error and exit status 2, before the (here missing)
    model is even looked for."""
    missing = str(tmp_path / "no-such-model")
    for args, message in [
        (["generate", "--max-tokens", "0", "hi"], "max_tokens=0"),
        (["generate", "--top-p", "0", "hi"], "top_p=0"),
        (["chat", "--temperature", "-1"], "temperature=-1"),
        (["generate", "--group-size", "64", "hi"], "--group-size 64 is the int4 group size"),
        (["serve", "--port", "70000"], "70000 is not a port"),
    ]:
        result = chat_cli(*args, "--model", missing)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and missing not in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_a_tensor_parallel_size_the_default_model_cannot_take_is_one_line():
    result = chat_cli("generate", "--tp", "2", "hi")
    assert result.returncode == 2
    assert "use one of 1, 3" in result.stderr and "Traceback" not in result.stderr


def test_an_empty_prompt_is_an_error_and_a_piped_one_loses_its_last_newline(tiny_chat_model):
    result = chat_cli("generate", "--model", tiny_chat_model, "")
    assert result.returncode == 2 and "empty" in result.stderr and "Traceback" not in result.stderr, result.stderr
    args = ("generate", "--model", tiny_chat_model, "--temperature", "0", "--max-tokens", "8")
    piped = chat_cli(*args, stdin="hello world\n")
    assert piped.returncode == 0 and piped.stdout == chat_cli(*args, "hello world").stdout


def test_chat_drops_its_oldest_exchanges_when_the_conversation_outgrows_the_context(tiny_chat_model):
    """A context of 64 tokens: by the third turn the conversation no longer fits; the oldest exchange goes (said
    on stderr) and every turn is answered. A message that does not fit even alone is not sent; the chat goes on."""
    turns = ["hello there my friend", "what is the capital of the country", "tell me more about it", "x " * 80, "thanks"]
    result = chat_cli(
        "chat", "--model", tiny_chat_model, "--max-model-len", "64", "--temperature", "0", "--max-tokens", "12",
        stdin="\n".join(turns) + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "oldest exchange was dropped" in result.stderr and "Traceback" not in result.stderr
    assert "\n[not sent: the prompt has" in result.stdout  # (the tiny model's answers are any bytes, newlines too)
