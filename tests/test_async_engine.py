"""AsyncEngine: concurrent requests from one event loop, streamed deltas, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from chat_core import Engine, EngineDeadError, LlamaModelRunner, SamplingParams
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


async def cache_freed(blocks, tries: int = 100) -> None:
    """Wait (up to a second) for every KV block to be free again; the caller asserts it."""
    for _ in range(tries):
        if blocks.num_free_blocks == blocks.num_blocks:
            return
        await asyncio.sleep(0.01)


def test_leaving_a_stream_cancels_it_and_frees_its_cache(engines):
    async_engine, _, _ = engines
    blocks = async_engine.engine.generator.block_manager

    async def main():
        async for _ in async_engine.stream(PROMPTS[3], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)):
            break
        await cache_freed(blocks)  # the engine thread frees it at its next turn

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


def _run_loop_in_thread(async_engine: AsyncEngine) -> tuple[threading.Thread, list[BaseException]]:
    loop_errors: list[BaseException] = []

    def run() -> None:
        try:
            async_engine.run_forever()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            loop_errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, loop_errors


async def _tokens(async_engine: AsyncEngine, prompt) -> list[int]:
    last = None
    async for last in async_engine.generate(prompt, GREEDY):
        pass
    return last.token_ids


def test_a_caller_that_leaves_while_its_request_is_queued_does_not_stop_the_engine_loop(tiny_chat_model, engines):
    _, expected, _ = engines
    async_engine = AsyncEngine.from_pretrained(tiny_chat_model, start_thread=False)

    async def leave_while_queued():
        task = asyncio.ensure_future(async_engine.submit(PROMPTS[0], GREEDY))
        await asyncio.sleep(0.05)  # queued: no engine loop has taken it yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave_while_queued())
    thread, loop_errors = _run_loop_in_thread(async_engine)
    try:
        tokens = asyncio.run(asyncio.wait_for(_tokens(async_engine, PROMPTS[1]), 60))
    finally:
        async_engine.stop()
        thread.join(30)
        async_engine.shutdown()
    assert loop_errors == []
    assert tokens == expected[1]
    assert async_engine.stats().steps > 0 and async_engine.stats().num_running == 0


def test_callers_that_leave_at_any_moment_leave_nothing_behind(tiny_chat_model, engines):
    _, expected, _ = engines
    async_engine = AsyncEngine.from_pretrained(tiny_chat_model, start_thread=False)
    thread, loop_errors = _run_loop_in_thread(async_engine)
    generator = async_engine.engine.generator

    async def leave_after(delay_s: float):
        task = asyncio.ensure_future(_tokens(async_engine, PROMPTS[3]))
        await asyncio.sleep(delay_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def main():
        await asyncio.gather(*(leave_after(i * 0.002) for i in range(40)))
        for _ in range(500):  # the engine frees what was aborted at its next turn
            if not generator.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(_tokens(async_engine, PROMPTS[2]), 60)

    try:
        tokens = asyncio.run(main())
        unfinished = generator.has_unfinished_requests()
        blocks = generator.block_manager
        all_free = blocks.num_free_blocks == blocks.num_blocks
    finally:
        async_engine.stop()
        thread.join(30)
        async_engine.shutdown()
    assert loop_errors == []
    assert tokens == expected[2]
    assert not unfinished and all_free


# The "event_loop" driver: the engine loop is a task on the caller's running event loop (a Jupyter kernel's).


class ThreadRecordingRunner(LlamaModelRunner):
    """Records the thread that runs each step: the event-loop driver must step on the loop's own thread."""

    step_threads: set[int] = set()

    def process_logits(self, logits, model_input):
        ThreadRecordingRunner.step_threads.add(threading.get_ident())
        return logits


def test_inside_a_running_loop_the_engine_steps_on_that_loop_between_its_other_tasks(tiny_chat_model, engines):
    _, expected, expected_text = engines
    ThreadRecordingRunner.step_threads.clear()
    engine = Engine.from_pretrained(tiny_chat_model, model_runner_cls=ThreadRecordingRunner)
    ticks = 0

    async def ticker():  # another task on the same loop, as a kernel's message handlers are
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def main():
        async_engine = AsyncEngine(engine)  # "auto" inside a running loop
        assert async_engine.driver == "event_loop" and "driver='event_loop'" in repr(async_engine)
        ticking = asyncio.create_task(ticker())
        try:
            steps_before, ticks_before = async_engine.stats().steps, ticks
            final = await async_engine.generate(PROMPTS[1], GREEDY)  # awaited: the finished output
            steps, ticks_during = async_engine.stats().steps - steps_before, ticks - ticks_before
            text = "".join([delta.text async for delta in async_engine.stream("hello world", GREEDY)])
            batch = await asyncio.gather(*(async_engine.generate(p, GREEDY) for p in PROMPTS))
        finally:
            ticking.cancel()
            async_engine.shutdown()
        return final, steps, ticks_during, text, batch, async_engine

    final, steps, ticks_during, text, batch, async_engine = asyncio.run(main())
    assert final.finished and final.token_ids == expected[1]
    assert text == expected_text
    assert [o.token_ids for o in batch] == expected and async_engine.stats().max_sequences_in_step > 1
    assert ThreadRecordingRunner.step_threads == {threading.get_ident()}  # no engine thread: this one
    assert steps >= 16 and ticks_during >= steps - 2  # the other task ran between steps: no step holds the loop long


def test_leaving_a_stream_on_the_event_loop_driver_frees_its_cache(tiny_chat_model):
    engine = Engine.from_pretrained(tiny_chat_model)
    blocks = engine.generator.block_manager

    async def main():
        async_engine = AsyncEngine(engine)
        async for _ in async_engine.stream(PROMPTS[3], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)):
            break
        await cache_freed(blocks)  # the engine task frees it at its next turn
        return async_engine

    async_engine = asyncio.run(main())
    try:
        assert blocks.num_free_blocks == blocks.num_blocks and async_engine.stats().num_running == 0
    finally:
        async_engine.shutdown()


def test_the_event_loop_driver_follows_its_caller_from_one_loop_to_the_next(tiny_chat_model, engines):
    _, expected, _ = engines
    async_engine = AsyncEngine.from_pretrained(tiny_chat_model, driver="event_loop")  # made outside any loop
    try:
        # Each asyncio.run is a new loop; the engine task that the first one ran was cancelled with it.
        first = asyncio.run(_tokens(async_engine, PROMPTS[0]))
        second = asyncio.run(_tokens(async_engine, PROMPTS[2]))
    finally:
        async_engine.shutdown()
    assert (first, second) == (expected[0], expected[2])


def test_shutdown_inside_the_loop_ends_the_engine_task(tiny_chat_model):
    async def main():
        async_engine = AsyncEngine.from_pretrained(tiny_chat_model)
        await async_engine.generate(PROMPTS[0], GREEDY)
        task = async_engine._task
        async_engine.shutdown()
        await asyncio.wait_for(task, 10)  # it ends at its next turn
        with pytest.raises(EngineDeadError, match="shut down"):
            await async_engine.generate(PROMPTS[0], GREEDY)

    asyncio.run(main())


def test_driver_choices_are_checked(tiny_chat_model):
    engine = Engine.from_pretrained(tiny_chat_model)
    try:
        with pytest.raises(ValueError, match="driver='fibers' is invalid: expected one of auto, thread, event_loop, caller"):
            AsyncEngine(engine, driver="fibers")
        with pytest.raises(ValueError, match="not both"):
            AsyncEngine(engine, driver="thread", start_thread=False)
        caller = AsyncEngine(engine, start_thread=False)
        assert caller.driver == "caller"
        threaded = AsyncEngine(engine, driver="thread")
        with pytest.raises(RuntimeError, match="needs driver='caller'"):
            threaded.run_forever()
        threaded.stop()
    finally:
        engine.shutdown()


def test_stats_count_prefix_cache_queries_hits_and_evictions(engines):
    async_engine, expected, _ = engines
    before = async_engine.stats()

    async def twice():
        return [await _tokens(async_engine, PROMPTS[3]) for _ in range(2)]

    assert asyncio.run(twice()) == [expected[3], expected[3]]
    after = async_engine.stats()
    # 40 tokens looked up twice; the second time all but the block holding the last token was found.
    assert after.prefix_cache_queries - before.prefix_cache_queries == 80
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 32
    assert 0 < after.prefix_cache_hit_rate < 1 and after.prefix_cache_evictions == 0
