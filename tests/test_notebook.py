"""examples/notebook.ipynb: stored without outputs, and run top to bottom on a real Jupyter kernel."""

from __future__ import annotations

import json
import os
import sys

import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "notebook.ipynb")
KERNEL_NAME = "chat-notebook-test"


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    stored = [cell.source.splitlines()[0] for cell in code_cells(notebook) if cell.outputs or cell.execution_count]
    assert not stored, f"strip the outputs of {NOTEBOOK} before committing it: {stored}"


@pytest.fixture
def kernel_for_this_python(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this interpreter (the one with chat_core installed), whatever `python` is on PATH."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "chat tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL_NAME


def outputs_of(notebook, source_start: str) -> list:
    [cell] = [cell for cell in code_cells(notebook) if cell.source.startswith(source_start)]
    return cell.outputs


def text_of(outputs) -> str:
    parts = []
    for output in outputs:
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif output.output_type == "execute_result":
            parts.append(output.data["text/plain"] + "\n")
    return "".join(parts)


def test_the_notebook_runs_top_to_bottom_on_a_jupyter_kernel(kernel_for_this_python):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name=kernel_for_this_python, resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    errors = [output for cell in code_cells(notebook) for output in cell.outputs if output.output_type == "error"]
    assert not errors

    assert "Engine(model='smollm2-135m-instruct', dtype='float32', device='cpu', quantization='gguf', tp=1, pp=1)" in text_of(
        outputs_of(notebook, "from chat_core import Engine")
    )
    assert "'The capital of France is' -> ' Paris." in text_of(outputs_of(notebook, "for output in outputs"))
    # Streamed: the text reached the cell in many messages, not in one at the end.
    for stream_cell in ("for delta in engine.stream(", "haiku = "):
        pieces = [output for output in outputs_of(notebook, stream_cell) if output.output_type == "stream"]
        assert len(pieces) >= 5, f"{stream_cell!r} printed {len(pieces)} piece(s)"
    chat = text_of(outputs_of(notebook, "messages = "))
    assert chat.count("assistant:") == 3 and "Paris" in chat
    assert "top 3: ' Paris'" in text_of(outputs_of(notebook, "import math"))
    banned = text_of(outputs_of(notebook, "banned = "))
    assert "default runner: The capital of France is Paris." in banned
    assert "Paris" not in banned.split("BanWordRunner:")[1] and "model_runner_cls=BanWordRunner" in banned
    pipelined = text_of(outputs_of(notebook, "pipelined = "))
    assert "same tokens as one process: True" in pipelined and "pp=2, model_runner_cls=BanWordRunner" in pipelined
    assert "AsyncEngine(driver='event_loop'" in text_of(outputs_of(notebook, "from chat_core import AsyncEngine"))
    assert "RequestOutput(request_id='areq-0', text=' Rome." in text_of(outputs_of(notebook, "await async_engine.generate"))
    assert "most sequences in one step: 3" in text_of(outputs_of(notebook, "import asyncio"))
    assert text_of(outputs_of(notebook, "async_engine.shutdown()")).strip().endswith("shut down)")
