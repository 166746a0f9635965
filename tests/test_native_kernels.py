"""The native CPU kernels (`chat_core.layers.native_kernels`): built once and cached, loaded from the cache
without a compiler, and every way of not having them falls back to torch's kernels with the same answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from chat_core.layers import native_kernels
from native_marks import needs_native_kernels

pytestmark = needs_native_kernels

# Loads the default model in a fresh process (the kernels are decided once per process) and reports.
PROBE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from chat_core import Engine, SamplingParams
from chat_core.layers import native_kernels
with Engine.from_pretrained(sys.argv[1]) as engine:
    model = engine.executor.worker.model_runner.model
    out = engine.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=12))
    print(json.dumps({
        "available": native_kernels.available(),
        "head": model.lm_head.method.name,
        "int4_native": model.layers[0].mlp.down_proj.method.kernel.native,
        "tokens": out.token_ids,
        "text": out.text,
    }))
"""


def probe(smollm2_path: str, **env: str) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, smollm2_path], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_the_kernels_are_built_once_then_loaded_without_a_compiler(tmp_path, smollm2_path):
    cache = str(tmp_path / "cache")
    built, _ = probe(smollm2_path, CHAT_CORE_CACHE_DIR=cache)
    assert built["available"] and built["head"] == "q8_0" and built["int4_native"]
    libraries = os.listdir(os.path.join(cache, "native"))
    assert len(libraries) == 1 and libraries[0].endswith(".so"), libraries
    # A second process finds the library in the cache: no compiler needed (a failing one is never run).
    loaded, _ = probe(smollm2_path, CHAT_CORE_CACHE_DIR=cache, CC="false")
    assert loaded["available"] and loaded["tokens"] == built["tokens"] and "Paris" in loaded["text"]
    assert os.listdir(os.path.join(cache, "native")) == libraries


def test_a_build_removes_libraries_unused_for_a_month(tmp_path, smollm2_path):
    native = tmp_path / "cache" / "native"
    native.mkdir(parents=True)
    stale, recent = native / "chat_kernels-0000000000000000.so", native / "quant_kernels-1111111111111111.so"
    other = native / "notes.txt"  # not a library of ours: never touched
    for path in (stale, recent, other):
        path.write_bytes(b"an older version's library")
    month_ago = time.time() - 31 * 86400
    for path in (stale, other):
        os.utime(path, (month_ago, month_ago))
    built, _ = probe(smollm2_path, CHAT_CORE_CACHE_DIR=str(tmp_path / "cache"))
    assert built["available"]
    left = sorted(path.name for path in native.iterdir())
    assert stale.name not in left and recent.name in left and other.name in left and len(left) == 3, left


def test_without_the_kernels_torch_kernels_give_the_same_answer(tmp_path, smollm2_path):
    native, _ = probe(smollm2_path, CHAT_CORE_CACHE_DIR=str(tmp_path / "native"))
    # A compiler that fails: reported once, and the engine runs on torch's kernels (the Q8_0 table dense).
    broken, log = probe(smollm2_path, CHAT_CORE_CACHE_DIR=str(tmp_path / "broken"), CC="false")
    assert not broken["available"] and broken["head"] == "dense" and not broken["int4_native"]
    assert "native CPU kernels unavailable" in log and "false exited with 1 compiling" in log
    # Turned off on purpose.
    off, log = probe(smollm2_path, CHAT_CORE_NATIVE_KERNELS="0")
    assert not off["available"] and off["head"] == "dense" and "CHAT_CORE_NATIVE_KERNELS=0" in log
    for other in (broken, off):  # torch's int4 kernel multiplies in bfloat16: a short answer stays the same
        assert other["text"] == native["text"] and "Paris" in other["text"]
