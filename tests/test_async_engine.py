"""AsyncEngine: concurrent requests from one event loop, streamed deltas, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from chat_core import Engine, SamplingParams
from chat_core.engine.async_engine import AsyncEngine

PROMPTS = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 9, 20, 40)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_chat_model):
    with Engine.from_pretrained(tiny_chat_model) as reference:
        expected = [o.token_ids for o in reference.generate(PROMPTS, GREEDY)]
        expected_text = reference.generate("hello world", GREEDY)[0].text
    async_engine = AsyncEngine.from_pretrained(tiny_chat_model)
    yield async_engine, expected, expected_text
    async_engine.shutdown()


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(engines):
    async_engine, expected, _ = engines

    async def one(prompt):
        last = None
        async for last in async_engine.generate(prompt, GREEDY):
            pass
        return last.token_ids

    async def main():
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    steps_before = async_engine.stats().steps
    assert asyncio.run(main()) == expected
    stats = async_engine.stats()
    assert stats.max_sequences_in_step > 1 and stats.steps - steps_before < 4 * 16


def test_stream_deltas_add_up_to_the_text(engines):
    async_engine, _, expected_text = engines

    async def main():
        return [delta async for delta in async_engine.stream("hello world", GREEDY)]

    deltas = asyncio.run(main())
    assert "".join(d.text for d in deltas) == expected_text
    assert sum(len(d.token_ids) for d in deltas) == 16 and deltas[-1].finish_reason == "length"


def test_leaving_a_stream_cancels_it_and_frees_its_cache(engines):
    async_engine, _, _ = engines
    blocks = async_engine.engine.generator.block_manager

    async def main():
        async for _ in async_engine.stream(PROMPTS[3], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)):
            break
        for _ in range(100):  # the engine thread frees it at its next turn
            if blocks.num_free_blocks == blocks.num_blocks:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert blocks.num_free_blocks == blocks.num_blocks
    assert async_engine.stats().num_running == 0


def test_bad_requests_fail_at_submission(engines):
    async_engine, _, _ = engines

    async def main():
        async for _ in async_engine.generate({"prompt_token_ids": []}, GREEDY):
            pass

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(main())
