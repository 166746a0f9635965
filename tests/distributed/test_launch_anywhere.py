"""Spawned ranks never re-run the user's main module: scripts without a main guard and the REPL work, and
a model runner class defined in the user's `__main__` runs on every rank (issue 9)."""

from __future__ import annotations

import ast

import pytest
import torch
from script_runs import assert_clean_exit, run_python

from chat_core import Engine, LlamaModelRunner, SamplingParams

# The script, exactly: no main guard, no shutdown.
UNGUARDED = """\
from chat_core import Engine, SamplingParams
eng = Engine.from_pretrained({layout})
print(eng.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].text)
"""


@pytest.mark.parametrize("layout", ["pipeline_parallel_size=2", "tensor_parallel_size=3"])
def test_an_unguarded_script_run_as_a_file_prints_paris(tmp_path, layout):
    (tmp_path / "script.py").write_text(UNGUARDED.format(layout=layout))
    result = run_python(["script.py"], tmp_path)
    assert_clean_exit(result, tmp_path)
    assert "Paris" in result.stdout


# A module next to the script (the ranks find it through the parent's sys.path) ...
MARKING_MODULE = """\
import os
from chat_core import LlamaModelRunner

class MarkingRunner(LlamaModelRunner):
    def load_model(self, checkpoint):
        rank = self.stage.rank * self.tp.size + self.tp.rank
        open(os.path.join("markers", f"rank{rank}-pid{os.getpid()}"), "w").close()
        super().load_model(checkpoint)
"""

# ... and a subclass defined in the script's own __main__, which travels by value. Written so that the
# REPL reads it too: a blank line after each block and none inside one.
SCRIPT = """\
import torch
from chat_core import Engine, SamplingParams
from marking import MarkingRunner

class BanningRunner(MarkingRunner):
    banned = []
    def process_logits(self, logits, model_input):
        return logits.index_fill(1, torch.tensor(self.banned), float("-inf"))

BanningRunner.banned = {banned}
engine = Engine.from_pretrained({model!r}, tensor_parallel_size=2, pipeline_parallel_size=2, model_runner_cls=BanningRunner)
print(engine.generate({{"prompt_token_ids": {prompt}}}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids)
"""
PROMPT = [5, 17, 33, 9, 100]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


class LocalBanningRunner(LlamaModelRunner):
    banned: list[int] = []

    def process_logits(self, logits: torch.Tensor, model_input) -> torch.Tensor:
        return logits.index_fill(1, torch.tensor(self.banned), float("-inf"))


@pytest.fixture(scope="module")
def mistral_dir(tiny_checkpoints):
    return tiny_checkpoints("mistral")[0]  # 8 heads, 2 kv heads, 4 layers: tp=2 x pp=2


@pytest.fixture(scope="module")
def banned_and_expected(mistral_dir):
    """The token one process picks first, and what one process generates with it banned."""
    with Engine.from_pretrained(mistral_dir) as engine:
        plain = engine.generate({"prompt_token_ids": PROMPT}, PARAMS)[0].token_ids
    LocalBanningRunner.banned = [plain[0]]
    with Engine.from_pretrained(mistral_dir, model_runner_cls=LocalBanningRunner) as engine:
        banned = engine.generate({"prompt_token_ids": PROMPT}, PARAMS)[0].token_ids
    assert banned != plain
    return [plain[0]], banned


@pytest.mark.parametrize("run_as", ["file", "repl"])
def test_a_runner_class_defined_in_main_runs_on_every_rank(tmp_path, mistral_dir, banned_and_expected, run_as):
    banned, expected = banned_and_expected
    (tmp_path / "marking.py").write_text(MARKING_MODULE)
    (tmp_path / "markers").mkdir()
    script = SCRIPT.format(banned=banned, model=mistral_dir, prompt=PROMPT)
    if run_as == "file":
        (tmp_path / "script.py").write_text(script)
        result = run_python(["script.py"], tmp_path)
    else:
        result = run_python(["-i"], tmp_path, stdin=script + "\n")  # the REPL, its prompts on stderr
    assert_clean_exit(result, tmp_path)
    printed = [line for line in result.stdout.replace(">>> ", "").splitlines() if line.startswith("[")]
    assert ast.literal_eval(printed[-1]) == expected  # the ban worked: the runner sampled on the last stage
    markers = sorted(path.name for path in (tmp_path / "markers").iterdir())
    assert [name.split("-")[0] for name in markers] == ["rank0", "rank1", "rank2", "rank3"]
    assert len({name.split("-")[1] for name in markers}) == 4  # four processes, each loading with our class
