"""The OpenAI API of a real `chat-cli serve` on SmolLM2, through the official `openai` client."""

from __future__ import annotations

import time

import httpx
import pytest

from chat_core import SamplingParams
from server_process import SMOLLM2_MAX_MODEL_LEN, SMOLLM2_MAX_TOKENS_LIMIT, SMOLLM2_NAME

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_lists_the_served_model(smollm2_server):
    models = smollm2_server.client().models.list().data
    assert [m.id for m in models] == [SMOLLM2_NAME]
    assert models[0].object == "model" and models[0].max_model_len == SMOLLM2_MAX_MODEL_LEN


def test_chat_completion_answers_with_usage(smollm2_server):
    response = smollm2_server.client().chat.completions.create(
        model=SMOLLM2_NAME,
        messages=QUESTION,
        temperature=0,
        max_tokens=12,
        user="someone",  # `user` is accepted and ignored
    )
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == SMOLLM2_NAME
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer(smollm2_server):
    client = smollm2_server.client()
    whole = client.chat.completions.create(model=SMOLLM2_NAME, messages=QUESTION, temperature=0, max_tokens=12)
    stream = client.chat.completions.create(
        model=SMOLLM2_NAME, messages=QUESTION, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert len([c for c in chunks if c.choices]) > 3  # really streamed, not one chunk
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    # The same prompt a second time: all of it but the block holding its last token came from the cache.
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16


def test_usage_counts_the_prompt_tokens_served_from_the_cache(smollm2_server):
    client = smollm2_server.client()
    system = {"role": "system", "content": "You answer questions about geography in one short sentence. " * 6}
    first = client.chat.completions.create(
        model=SMOLLM2_NAME, messages=[system, {"role": "user", "content": "Where is Lima?"}], temperature=0, max_tokens=4
    )
    second = client.chat.completions.create(
        model=SMOLLM2_NAME, messages=[system, {"role": "user", "content": "Where is Oslo?"}], temperature=0, max_tokens=4
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # no earlier request had this system prompt
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and 64 <= cached < second.usage.prompt_tokens  # the shared system prompt, in full blocks
    completion = client.completions.create(model=SMOLLM2_NAME, prompt=[[7] * 40, [7] * 40], temperature=0, max_tokens=2)
    assert completion.usage.prompt_tokens_details.cached_tokens == 32  # the second prompt found the first's 2 full blocks


def test_completion_of_text_and_of_token_ids(smollm2_server, smollm2_engine):
    client = smollm2_server.client()
    prompt = "The capital of France is"
    token_ids = smollm2_engine.encode_prompt(prompt)[1]
    from_text = client.completions.create(model=SMOLLM2_NAME, prompt=prompt, temperature=0, max_tokens=6)
    assert from_text.object == "text_completion" and "Paris" in from_text.choices[0].text
    assert from_text.usage.prompt_tokens == len(token_ids)
    from_ids = client.completions.create(model=SMOLLM2_NAME, prompt=[token_ids, token_ids[:-1]], temperature=0, max_tokens=6)
    assert [c.index for c in from_ids.choices] == [0, 1]
    assert from_ids.choices[0].text == from_text.choices[0].text
    assert from_ids.usage.prompt_tokens == 2 * len(token_ids) - 1
    assert from_ids.usage.completion_tokens == 12 and from_ids.choices[0].finish_reason == "length"


def test_streamed_completion_with_usage(smollm2_server):
    client = smollm2_server.client()
    stream = client.completions.create(
        model=SMOLLM2_NAME,
        prompt="Once upon a time",
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    whole = client.completions.create(model=SMOLLM2_NAME, prompt="Once upon a time", temperature=0, max_tokens=8)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8 == whole.usage.completion_tokens


def test_n_completions_each_with_its_own_index(smollm2_server):
    client = smollm2_server.client()
    asked = dict(model=SMOLLM2_NAME, messages=QUESTION, n=2, temperature=1.0, seed=7, max_tokens=8)
    response = client.chat.completions.create(**asked, logprobs=True)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == sum(len(c.logprobs.content) for c in response.choices)
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in response.choices}  # the same seed gives the same answers


def test_stop_strings_cut_the_answer(smollm2_server):
    client = smollm2_server.client()
    free = client.completions.create(model=SMOLLM2_NAME, prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=12).choices[0]
    assert " 7," in free.text
    for stop in (" 7", [" 9", " 7"]):
        cut = client.completions.create(model=SMOLLM2_NAME, prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=12, stop=stop)
        assert cut.choices[0].text == free.text[: free.text.index(" 7")]
        assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(smollm2_server):
    client = smollm2_server.client()

    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model=SMOLLM2_NAME, messages=QUESTION, temperature=1.2, top_p=0.95, seed=seed, max_tokens=16
        )
        return response.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_penalties_are_applied(smollm2_server):
    client = smollm2_server.client()
    prompt = "the the the the the the"
    plain = client.completions.create(model=SMOLLM2_NAME, prompt=prompt, temperature=0, max_tokens=10).choices[0].text
    penalized = (
        client.completions.create(
            model=SMOLLM2_NAME, prompt=prompt, temperature=0, max_tokens=10, frequency_penalty=2.0, presence_penalty=2.0
        )
        .choices[0]
        .text
    )
    assert plain.count("the") > penalized.count("the")


def test_chat_logprobs(smollm2_server):
    response = smollm2_server.client().chat.completions.create(
        model=SMOLLM2_NAME, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    assert "".join(e.token for e in content).startswith(response.choices[0].message.content[:5])


def test_completion_logprobs(smollm2_server):
    choice = (
        smollm2_server.client()
        .completions.create(model=SMOLLM2_NAME, prompt="The capital of France is", temperature=0, max_tokens=5, logprobs=2)
        .choices[0]
    )
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert "".join(logprobs.tokens) == choice.text


def test_greedy_answers_equal_the_engine(smollm2_server, smollm2_engine):
    client = smollm2_server.client()
    params = SamplingParams(temperature=0, max_tokens=24)
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colors."}]
    expected_chat = smollm2_engine.chat(conversation, params)
    answer = client.chat.completions.create(model=SMOLLM2_NAME, messages=conversation, temperature=0, max_tokens=24)
    assert answer.choices[0].message.content == expected_chat.text
    assert answer.usage.completion_tokens == len(expected_chat.token_ids)
    assert answer.usage.prompt_tokens == len(expected_chat.prompt_token_ids)

    expected = smollm2_engine.generate("def fibonacci(n):", params)[0]
    completion = client.completions.create(model=SMOLLM2_NAME, prompt="def fibonacci(n):", temperature=0, max_tokens=24)
    assert completion.choices[0].text == expected.text
    assert completion.choices[0].finish_reason == expected.finish_reason


def test_health_and_metrics(smollm2_server):
    health = httpx.get(f"{smollm2_server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = smollm2_server.metrics()
    for name in (
        "chat_sequences_running",
        "chat_sequences_waiting",
        "chat_prompt_tokens_total",
        "chat_generation_tokens_total",
        "chat_engine_steps_total",
        "chat_max_sequences_in_step",
        'chat_requests_finished_total{finish_reason="stop"}',
        "chat_time_to_first_token_seconds_count",
        "chat_inter_token_latency_seconds_count",
        "chat_prefix_cache_queries_total",
        "chat_prefix_cache_hits_total",
        "chat_prefix_cache_hit_rate",
        "chat_prefix_cache_evictions_total",
    ):
        assert name in metrics, name
    assert metrics["chat_generation_tokens_total"] > 0 and metrics["chat_time_to_first_token_seconds_count"] > 0
    # Every test above shares SmolLM2's default system prompt: some of each prompt was found in the cache.
    assert 0 < metrics["chat_prefix_cache_hits_total"] < metrics["chat_prefix_cache_queries_total"]
    rate = metrics["chat_prefix_cache_hits_total"] / metrics["chat_prefix_cache_queries_total"]
    assert metrics["chat_prefix_cache_hit_rate"] == pytest.approx(rate, abs=0.01)


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(smollm2_server):
    aborted_before = smollm2_server.metrics()['chat_requests_finished_total{finish_reason="abort"}']
    body = {"model": SMOLLM2_NAME, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{smollm2_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6))]  # a few events: it is generating
        assert any(line.startswith("data: {") for line in received)
        assert smollm2_server.metrics()["chat_sequences_running"] == 1
    # Leaving the block closed the connection, long before 400 tokens at ~30 tokens/s.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and smollm2_server.metrics()["chat_sequences_running"] != 0:
        time.sleep(0.1)
    metrics = smollm2_server.metrics()
    assert metrics["chat_sequences_running"] == 0
    assert metrics['chat_requests_finished_total{finish_reason="abort"}'] == aborted_before + 1
    assert metrics["chat_generation_tokens_total"] > 0
    assert httpx.get(f"{smollm2_server.url}/health").json()["sequences_running"] == 0


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_sequence(smollm2_server):
    # 512 tokens take over 2 s even at 250 tokens/s; the client gives up after 1 s.
    body = {"model": SMOLLM2_NAME, "prompt": "Count to a thousand:", "max_tokens": SMOLLM2_MAX_TOKENS_LIMIT, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{smollm2_server.url}/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and smollm2_server.metrics()["chat_sequences_running"] != 0:
        time.sleep(0.1)
    assert smollm2_server.metrics()["chat_sequences_running"] == 0
