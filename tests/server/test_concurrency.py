"""Many clients at once on a real server: each gets what it would get alone, in batches the engine shares."""

from __future__ import annotations

import asyncio

from chat_core import Engine, SamplingParams

NUM_CLIENTS = 32
MAX_TOKENS = 48  # long enough that the 32 requests overlap however fast steps are


def conversation(i: int) -> list[dict[str, str]]:
    subjects = ["the quick brown fox", "hello world", "the capital of France", "numbers 0123456789"]
    return [{"role": "user", "content": f"{subjects[i % 4]} {'again ' * (i // 4)}"}]


async def stream_answer(client, model: str, messages) -> tuple[str, str | None, int]:
    """(text, finish reason, number of content chunks) of one streamed chat completion."""
    stream = await client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS, stream=True, extra_body={"ignore_eos": True}
    )
    text, finish_reason, chunks = "", None, 0
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            chunks += bool(choice.delta.content)
            finish_reason = choice.finish_reason or finish_reason
    return text, finish_reason, chunks


def test_32_streaming_clients_get_their_answers_alone_and_batched(tiny_server, tiny_chat_model):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with Engine.from_pretrained(tiny_chat_model) as engine:  # one request at a time: what each client would get alone
        expected = [engine.chat(conversation(i), params).text for i in range(NUM_CLIENTS)]

    async def all_clients():
        client = tiny_server.async_client()
        async with client:
            return await asyncio.gather(*(stream_answer(client, tiny_server.model, conversation(i)) for i in range(NUM_CLIENTS)))

    before = tiny_server.metrics()
    results = asyncio.run(all_clients())
    after = tiny_server.metrics()

    assert len(set(expected)) > NUM_CLIENTS // 2  # different prompts, different answers: no mix-up goes unseen
    assert [text for text, _, _ in results] == expected
    assert all(reason == "length" for _, reason, _ in results)
    assert all(chunks > 1 for _, _, chunks in results)  # streamed, not delivered whole
    tokens = after["chat_generation_tokens_total"] - before["chat_generation_tokens_total"]
    steps = after["chat_engine_steps_total"] - before["chat_engine_steps_total"]
    assert tokens == NUM_CLIENTS * MAX_TOKENS
    # Continuous batching: steps advance many sequences at once, so there are far fewer steps than tokens.
    assert after["chat_max_sequences_in_step"] > 1
    assert steps < tokens / 4, (steps, tokens)
    assert after["chat_sequences_running"] == 0 and after["chat_sequences_waiting"] == 0
