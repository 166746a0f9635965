"""Short reprs: what a notebook cell or a log line shows for an Engine, a RequestOutput, SamplingParams."""

from __future__ import annotations

import ast

from hypothesis import given
from hypothesis import strategies as st

from chat_core import CompletionOutput, Engine, LlamaModelRunner, Logprob, RequestOutput, SamplingParams

# Values that differ from the defaults (or equal them), field by field.
PARAM_VALUES = {
    "n": st.integers(1, 4),
    "temperature": st.sampled_from([0, 0.5, 1.0, 1.3]),
    "top_p": st.sampled_from([0.9, 1.0]),
    "top_k": st.sampled_from([0, 5, 40]),
    "min_p": st.sampled_from([0.0, 0.05]),
    "seed": st.sampled_from([None, 0, 7]),
    "max_tokens": st.sampled_from([None, 16, 64]),
    "stop": st.sampled_from([(), ("\n",), ("END", "STOP")]),
    "stop_token_ids": st.sampled_from([(), (2,)]),
    "ignore_eos": st.booleans(),
    "logprobs": st.sampled_from([None, 0, 5]),
    "repetition_penalty": st.sampled_from([1.0, 1.1]),
    "presence_penalty": st.sampled_from([0.0, 0.5]),
    "frequency_penalty": st.sampled_from([0.0, -0.5]),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
}


def test_default_sampling_params_show_nothing():
    assert repr(SamplingParams()) == "SamplingParams()"
    assert repr(SamplingParams(temperature=0, max_tokens=64)) == "SamplingParams(temperature=0, max_tokens=64)"


@given(st.fixed_dictionaries({}, optional=PARAM_VALUES))
def test_sampling_params_repr_names_exactly_the_changed_fields_and_evaluates_back(kwargs):
    params = SamplingParams(**kwargs)
    text = repr(params)
    defaults = SamplingParams()
    changed = {name for name, value in kwargs.items() if getattr(defaults, name) != value}
    shown = {keyword.arg for keyword in ast.parse(text, mode="eval").body.keywords}
    assert shown == changed, text
    assert eval(text, {"SamplingParams": SamplingParams}) == params


def _completion(index: int, text: str, finish_reason: str | None, num_tokens: int) -> CompletionOutput:
    logprobs = [Logprob(i, -0.5, "x") for i in range(num_tokens)]
    top_logprobs = [logprobs] * num_tokens
    return CompletionOutput(index, text, list(range(num_tokens)), finish_reason, logprobs=logprobs, top_logprobs=top_logprobs)


def test_request_output_repr_is_one_short_line_with_the_text_and_finish_reason():
    long_text = "The sea is wide. " * 600
    output = RequestOutput("req-3", "Describe the sea", list(range(7)), [_completion(0, long_text, "length", 1000)], True)
    text = repr(output)
    assert text.startswith("RequestOutput(request_id='req-3', text='The sea is wide. The sea")
    assert "\u2026" in text and "finish_reason='length'" in text
    assert "prompt_tokens=7" in text and "completion_tokens=1000" in text
    assert len(text) < 200 and "\n" not in text and "Logprob" not in text


def test_a_short_text_is_shown_whole_and_n_completions_each_shown():
    single = RequestOutput("r", None, [1, 2], [_completion(0, "Paris.", "stop", 2)], True)
    expected = "RequestOutput(request_id='r', text='Paris.', finish_reason='stop', prompt_tokens=2, completion_tokens=2)"
    assert repr(single) == expected
    pair = RequestOutput("r", None, [1], [_completion(0, "a", "stop", 1), _completion(1, "b", None, 3)])
    assert "CompletionOutput(index=0, text='a', finish_reason='stop', tokens=1, logprobs=1)" in repr(pair)
    assert "CompletionOutput(index=1, text='b', finish_reason=None, tokens=3, logprobs=3)" in repr(pair)
    assert "completion_tokens=4" in repr(pair)


class NamedRunner(LlamaModelRunner):
    pass


def test_engine_repr_shows_the_model_and_how_it_runs(tiny_chat_model):
    engine = Engine.from_pretrained(tiny_chat_model, model_runner_cls=NamedRunner)
    try:
        assert repr(engine) == (
            f"Engine(model={tiny_chat_model!r}, dtype='float32', device='cpu', quantization=None, tp=1, pp=1, "
            "model_runner_cls=NamedRunner)"
        )
    finally:
        engine.shutdown()
    assert repr(engine).endswith("model_runner_cls=NamedRunner, shut down)")
