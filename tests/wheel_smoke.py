"""What a user who ran `pip install chat-core[cli]` meets: checks the installed wheels, not the source tree.

Run by `nox -s wheels` (not by pytest), with the Python of a fresh virtual environment holding only
torch, our wheels and their dependencies, from a directory outside the repository:

    python -I wheel_smoke.py chat-core=0.1.0 chat-distributed=0.1.0 chat-core-cli=0.1.0 [--lowest]

Checks, in order: where the packages were imported from; `chat-cli --version`; the README's
design-card line with the default model; `chat-cli generate`; `chat-cli serve` (/health,
/v1/models, a chat completion, and the chat page at / with its static files when the package ships
one); a pipeline_parallel_size=2 generate giving the same tokens; a tiny safetensors checkpoint
with a SentencePiece tokenizer and a chat template. Exits non-zero at the first failure.
"""

from __future__ import annotations

import argparse
import html.parser
import importlib.resources
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata

IMPORT_NAMES = {"chat-core": "chat_core", "chat-distributed": "chat_distributed", "chat-core-cli": "chat_cli"}
MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
SERVE_START_TIMEOUT_S = 300  # model load on a busy 2-core machine
SERVE_STOP_TIMEOUT_S = 60


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Check the installed chat-core, chat-distributed and chat-core-cli wheels.")
    parser.add_argument("versions", nargs=3, metavar="DISTRIBUTION=VERSION", help="the built wheels' versions")
    parser.add_argument(
        "--lowest",
        action="store_true",
        help="dependencies are at their declared lower bounds: skip the checks no third-party version changes",
    )
    args = parser.parse_args(argv)
    expected = dict(arg.split("=", 1) for arg in args.versions)
    if set(expected) != set(IMPORT_NAMES):
        parser.error(f"expected versions of {sorted(IMPORT_NAMES)}; got {args.versions}")
    # (name, check, whether it tells something about dependency versions; the others are run once)
    steps = [
        ("installed from wheels", lambda: check_installed(expected), True),
        ("chat-cli --version", lambda: check_version_flag(expected), True),
        ("design-card line", check_design_card_line, True),  # gguf, numpy, tokenizers
        ("chat-cli generate", check_cli_generate, False),
        ("chat-cli serve", check_serve, True),  # fastapi, starlette, uvicorn, pydantic, prometheus-client, jinja2
        ("pipeline_parallel_size=2", check_pipeline_parallel, True),  # chat_distributed's own dependencies (process launch)
        ("safetensors + sentencepiece checkpoint", check_safetensors_checkpoint, True),  # safetensors, sentencepiece, jinja2
    ]
    passed = skipped = 0
    for name, step, about_dependencies in steps:
        if args.lowest and not about_dependencies:
            print(f"skip {name} (no dependency version changes it; run with the latest dependencies)", flush=True)
            skipped += 1
            continue
        started = time.perf_counter()
        try:
            detail = step()
        except BaseException:
            print(f"FAIL {name}\nsmoke: {passed} passed, 1 failed", flush=True)
            raise
        passed += 1
        print(f"ok   {name} ({time.perf_counter() - started:.1f} s){': ' + detail if detail else ''}", flush=True)
    print(f"smoke: {passed} passed, 0 failed" + (f", {skipped} skipped" if skipped else ""))  # the closing line CI reads
    return 0


def check_installed(expected: dict[str, str]) -> str:
    """Each package imports from this environment's site-packages, as a regular (not editable) install."""
    site_packages = os.path.realpath(sysconfig.get_paths()["purelib"])
    for distribution, import_name in IMPORT_NAMES.items():
        spec = importlib.util.find_spec(import_name)
        assert spec is not None and spec.origin, f"{import_name} is not importable"
        origin = os.path.realpath(spec.origin)
        assert origin.startswith(site_packages + os.sep), f"{import_name} comes from {origin}, not {site_packages}"
        version = metadata.version(distribution)
        assert version == expected[distribution], f"{distribution} {version} installed; the built wheel is {expected[distribution]}"
        direct_url = json.loads(metadata.distribution(distribution).read_text("direct_url.json") or "{}")
        assert not direct_url.get("dir_info", {}).get("editable"), f"{distribution} is an editable install: {direct_url}"
        shipped = {str(path) for path in metadata.files(distribution) or []}
        assert f"{import_name}/py.typed" in shipped, f"{distribution} does not ship {import_name}/py.typed"
    return f"from {site_packages}"


def check_version_flag(expected: dict[str, str]) -> str:
    report = run_command([console_script("chat-cli"), "--version"], timeout=120)
    wanted = [
        f"chat-cli {expected['chat-core-cli']} (pip install chat-core-cli)",
        f"chat-core {expected['chat-core']}",
        f"chat-distributed {expected['chat-distributed']}",
        f"torch {metadata.version('torch')}",
    ]
    missing = [line for line in wanted if line not in report.splitlines()]
    assert not missing, f"chat-cli --version printed {report!r}; missing {missing}"
    return " | ".join(report.splitlines())


_reference_tokens: list[int] = []


def check_design_card_line() -> str:
    from chat_core import Engine, SamplingParams

    # The README's line; `with` so that the engine is shut down before the next check.
    with Engine.from_pretrained(MODEL) as engine:
        output = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0]
    assert "Paris" in output.text, f"greedy {MODEL} completed {PROMPT!r} with {output.text!r}; expected Paris"
    _reference_tokens[:] = output.token_ids
    return repr(PROMPT + output.text)


def check_cli_generate() -> str:
    command = [console_script("chat-cli"), "generate", "--chat-template", "--temperature", "0", "--max-tokens", "12"]
    text = run_command([*command, "What is the capital of France?"], timeout=300)
    assert "Paris" in text, f"chat-cli generate printed {text!r}; expected Paris"
    return repr(text.strip().splitlines()[0])


def check_pipeline_parallel() -> str:
    import chat_distributed
    from chat_core import Engine, SamplingParams

    assert chat_distributed.__version__ == metadata.version("chat-distributed")
    with Engine.from_pretrained(MODEL, pipeline_parallel_size=2) as engine:
        output = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))[0]
    assert _reference_tokens, "the design-card check runs first and records the single-process tokens"
    assert output.token_ids == _reference_tokens, f"pp=2 gave {output.token_ids}, one process gave {_reference_tokens}"
    return f"same {len(output.token_ids)} tokens as one process"


def check_safetensors_checkpoint() -> str:
    """A tiny Llama checkpoint in Hugging Face's layout: safetensors, tokenizer.model, a chat template."""
    from chat_core import Engine, SamplingParams

    directory = tempfile.mkdtemp(prefix="chat-tiny-")
    try:
        vocab_size = write_sentencepiece_tokenizer(directory)
        write_tiny_llama(directory, vocab_size)
        with Engine.from_pretrained(directory) as engine:
            reply = engine.chat([{"role": "user", "content": "hello world"}], SamplingParams(max_tokens=6, ignore_eos=True, seed=0))
        assert len(reply.token_ids) == 6, f"asked for 6 tokens, got {reply.token_ids}"
        return f"{len(reply.token_ids)} tokens, vocabulary {vocab_size}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_sentencepiece_tokenizer(directory: str) -> int:
    import io

    import sentencepiece

    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "hello", "world", "model", "token", "engine"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=64, model_type="bpe", minloglevel=2
    )
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False, "chat_template": template}
    write_json(os.path.join(directory, "tokenizer_config.json"), config)
    return 64


def write_tiny_llama(directory: str, vocab_size: int) -> None:
    import torch
    from safetensors.torch import save_file

    hidden, intermediate, layers, heads, kv_heads = 32, 64, 2, 4, 2
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    tensors = {"model.embed_tokens.weight": weight(vocab_size, hidden), "model.norm.weight": torch.ones(hidden)}
    tensors["lm_head.weight"] = weight(vocab_size, hidden)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        tensors[prefix + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden)
        tensors[prefix + "self_attn.q_proj.weight"] = weight(heads * head_dim, hidden)
        tensors[prefix + "self_attn.k_proj.weight"] = weight(kv_heads * head_dim, hidden)
        tensors[prefix + "self_attn.v_proj.weight"] = weight(kv_heads * head_dim, hidden)
        tensors[prefix + "self_attn.o_proj.weight"] = weight(hidden, heads * head_dim)
        tensors[prefix + "mlp.gate_proj.weight"] = weight(intermediate, hidden)
        tensors[prefix + "mlp.up_proj.weight"] = weight(intermediate, hidden)
        tensors[prefix + "mlp.down_proj.weight"] = weight(hidden, intermediate)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    write_json(os.path.join(directory, "config.json"), config)


# --- chat-cli serve ------------------------------------------------------------------------------


def check_serve() -> str:
    command = [console_script("chat-cli"), "serve", "--host", "127.0.0.1", "--port", "0", "--max-tokens-limit", "16"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []
    threading.Thread(target=_pump, args=(server.stdout, lines), daemon=True).start()
    try:
        base_url = _wait_for_ready_line(lines, output)
        _wait_for_health(base_url)
        models = json.loads(http_get(f"{base_url}/v1/models")[1])
        ids = [model["id"] for model in models["data"]]
        assert ids == [MODEL], f"/v1/models lists {ids}; expected [{MODEL!r}]"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}
        completion = json.loads(http_post_json(f"{base_url}/v1/chat/completions", body))
        usage = completion["usage"]["completion_tokens"]
        assert 1 <= usage <= 4, f"asked for at most 4 tokens, the server reports {usage}: {completion}"
        page = check_chat_page(base_url)
        server.send_signal(signal.SIGTERM)
        returncode = server.wait(timeout=SERVE_STOP_TIMEOUT_S)
        assert returncode == 0, f"chat-cli serve exited {returncode} after SIGTERM"
        return f"{base_url}: /health, /v1/models, /v1/chat/completions; {page}; stopped by SIGTERM with exit 0"
    except BaseException:
        print("chat-cli serve printed:\n" + "".join(output) + _drain(lines), file=sys.stderr)
        raise
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def check_chat_page(base_url: str) -> str:
    """When chat_cli ships an HTML page, GET / serves it and every local file it links to."""
    shipped = [path for path in _package_files(importlib.resources.files("chat_cli")) if path.endswith(".html")]
    if not shipped:
        return "no chat page shipped (no .html in chat_cli), GET / not checked"
    content_type, page = http_get(f"{base_url}/")
    assert content_type.startswith("text/html"), f"GET / answered {content_type!r}; chat_cli ships {shipped}"
    links = _local_links(page.decode("utf-8"))
    for link in links:
        _, asset = http_get(urllib.parse.urljoin(f"{base_url}/", link))
        assert asset, f"GET {link} (linked from /) is empty"
    return f"GET / and its {len(links)} linked files"


def _package_files(root: importlib.resources.abc.Traversable, prefix: str = "") -> list[str]:
    found = []
    for entry in root.iterdir():
        if entry.is_dir():
            found += _package_files(entry, f"{prefix}{entry.name}/")
        else:
            found.append(prefix + entry.name)
    return found


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


def _local_links(page: str) -> list[str]:
    parser = _LinkParser()
    parser.feed(page)
    # Same-origin files only: not other sites, not data: URLs, not in-page anchors, not the API.
    return sorted({link for link in parser.links if not re.match(r"^([a-z]+:|//|#)", link) and "/v1/" not in link})


def _wait_for_ready_line(lines: queue.Queue[str | None], output: list[str]) -> str:
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError("chat-cli serve exited before it was serving")
        output.append(line)
        match = re.search(r"serving \S+ on (http://\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"chat-cli serve printed no 'serving ... on http://...' line within {SERVE_START_TIMEOUT_S} s")


def _wait_for_health(base_url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            http_get(f"{base_url}/health")
            return
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"GET {base_url}/health kept failing: {exc}") from exc
            time.sleep(0.2)


def _pump(stream, lines: queue.Queue[str | None]) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        lines.put(line)
    lines.put(None)


def _drain(lines: queue.Queue[str | None]) -> str:
    rest = []
    while not lines.empty():
        line = lines.get_nowait()
        if line is not None:
            rest.append(line)
    return "".join(rest)


# --- small helpers --------------------------------------------------------------------------------


def http_get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200, f"GET {url} answered {response.status}"
        return response.headers.get("content-type", ""), response.read()


def http_post_json(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200, f"POST {url} answered {response.status}"
        return response.read()


def console_script(name: str) -> str:
    """The entry point this environment installed (not one found first on PATH)."""
    path = os.path.join(sysconfig.get_paths()["scripts"], name)
    assert os.path.isfile(path), f"the wheel installed no {name} command in {os.path.dirname(path)}"
    return path


def run_command(command: list[str], timeout: float) -> str:
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
