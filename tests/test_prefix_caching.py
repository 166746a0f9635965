"""Automatic prefix caching: what a cached run computes again, and that it gives what an uncached run gives."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chat_core import Engine, LlamaModelRunner, SamplingParams
from chat_core.engine.sequence import Sequence

BYTES_PER_SLOT = 4 * 2 * 16 * 4 * 4  # tiny llama: layers * (k, v) * head_dim * kv_heads * float32
BLOCK_SIZES = (1, 3, 4, 16)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)


def cache_gib(num_blocks: int, block_size: int) -> float:
    return num_blocks * block_size * BYTES_PER_SLOT / 2**30


def ids(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt}


class Engines:
    """One engine per (block size, cache size, caching), made on first use and kept for the module."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._made: dict[tuple[int, int, bool], Engine] = {}

    def get(self, block_size: int, num_blocks: int = 256, caching: bool = True) -> Engine:
        key = (block_size, num_blocks, caching)
        if key in self._made and not is_idle(self._made[key]):
            self._made.pop(key).shutdown()  # an earlier failure left it mid-way: don't let it spoil the next test
        if key not in self._made:
            self._made[key] = Engine.from_pretrained(
                self.directory,
                block_size=block_size,
                kv_cache_memory_gib=cache_gib(num_blocks, block_size),
                enable_prefix_caching=caching,
                max_num_batched_tokens=64,
            )
        return self._made[key]

    def close(self) -> None:
        for engine in self._made.values():
            engine.shutdown()


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    made = Engines(tiny_checkpoints("llama")[0])
    yield made
    made.close()


def is_idle(engine: Engine) -> bool:
    blocks = engine.generator.block_manager
    return not engine.generator.has_unfinished_requests() and blocks.num_free_blocks == blocks.num_blocks


def assert_same_outputs(ours, expected) -> None:
    assert len(ours.outputs) == len(expected.outputs)
    for a, b in zip(ours.outputs, expected.outputs):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-5)
        for top_a, top_b in zip(a.top_logprobs, b.top_logprobs):
            assert [x.token_id for x in top_a] == [x.token_id for x in top_b]
            assert [x.logprob for x in top_a] == pytest.approx([x.logprob for x in top_b], abs=1e-5)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_hit(earlier_tokens: list[int], prompt: list[int], block_size: int) -> int:
    """Tokens of `prompt` found in a roomy cache after a request that computed `earlier_tokens`."""
    full_blocks = min(common_prefix(earlier_tokens, prompt) // block_size, (len(prompt) - 1) // block_size)
    return full_blocks * block_size


@st.composite
def shared_prefix_cases(draw):
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    # Prefix lengths on either side of a block boundary, and on it.
    prefix_len = max(1, draw(st.integers(0, 4)) * block_size + draw(st.sampled_from([-1, 0, 1])))
    tokens = st.integers(3, 300)
    prefix = draw(st.lists(tokens, min_size=prefix_len, max_size=prefix_len))
    first = prefix + draw(st.lists(tokens, max_size=5))
    second = prefix + draw(st.lists(tokens, max_size=5))  # may equal `first`: the whole prompt is cached
    return block_size, first, second, draw(st.sampled_from([1, 2, 3])), draw(st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shared_prefix_cases())
def test_cached_runs_give_the_uncached_tokens_and_logprobs(engines, case):
    block_size, first, second, n, tiny_cache = case
    params = SamplingParams(n=n, temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    reference = engines.get(block_size, caching=False)
    expected_first, expected_second = reference.generate([ids(first), ids(second)], params)
    # A follow-up, as in a chat: the first prompt, its answer, and more.
    follow_up = first + expected_first.outputs[0].token_ids + [5, 6, 7][: len(second) % 4]
    expected_follow_up = reference.generate(ids(follow_up), params)[0]

    # A tiny cache holds the longest sequence (the follow-up and its answer) and nothing more: the n > 1
    # and concurrent runs below preempt.
    num_blocks = -(-(len(follow_up) + 10) // block_size) if tiny_cache else 256
    engine = engines.get(block_size, num_blocks)
    engine.reset_prefix_cache()
    preemptions = engine.generator.scheduler.stats.preemptions
    one = engine.generate(ids(first), params)[0]
    two = engine.generate(ids(second), params)[0]
    both = engine.generate([ids(second), ids(first)], params)
    three = engine.generate(ids(follow_up), params)[0]
    assert_same_outputs(one, expected_first)
    assert_same_outputs(two, expected_second)
    assert_same_outputs(both[0], expected_second)
    assert_same_outputs(both[1], expected_first)
    assert_same_outputs(three, expected_follow_up)
    event(f"tiny cache: {tiny_cache}, preempted: {engine.generator.scheduler.stats.preemptions > preemptions}")
    if not tiny_cache:
        earlier = first + one.outputs[0].token_ids[:-1]  # the last sampled token was never fed back
        assert one.num_cached_tokens == 0
        assert two.num_cached_tokens == expected_hit(earlier, second, block_size)
        assert both[1].num_cached_tokens == (len(first) - 1) // block_size * block_size
        assert three.num_cached_tokens == expected_hit(earlier, follow_up, block_size)
    assert is_idle(engine)


def test_the_n_completions_of_a_request_share_its_prompt_blocks(engines):
    engine = engines.get(4)
    engine.reset_prefix_cache()
    blocks = engine.generator.block_manager
    prompt = list(range(10, 40))  # 30 tokens: 7 full blocks and a partial one
    engine.add_request(ids(prompt), SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True))
    engine.generator.step()
    tables = [seq.block_table for seq in engine.generator.scheduler.running]
    assert len(tables) == 3
    # The first completion computes the prompt; the others take its 7 full blocks and compute the rest.
    assert tables[1][:7] == tables[0][:7] and tables[2][:7] == tables[0][:7]
    assert len({tables[0][7], tables[1][7], tables[2][7]}) == 3  # the partial block is each one's own
    assert blocks.num_free_blocks == blocks.num_blocks - 7 - 3  # the shared blocks are held once
    while engine.generator.has_unfinished_requests():
        engine.generator.step()
    assert is_idle(engine)


def test_seeded_n_completions_match_an_uncached_engine(engines):
    params = SamplingParams(n=3, temperature=1.0, top_k=50, seed=11, max_tokens=8, ignore_eos=True, logprobs=2)
    prompt = ids(list(range(50, 90)))
    expected = engines.get(4, caching=False).generate(prompt, params)[0]
    engine = engines.get(4)
    engine.generate(prompt, params)  # everything but the last partial block is cached now
    again = engine.generate(prompt, params)[0]
    assert again.num_cached_tokens == 36
    assert_same_outputs(again, expected)


def probe(engine: Engine, prompt: list[int]) -> int:
    """Tokens of `prompt` the cache holds now (what its admission would skip)."""
    blocks = engine.generator.block_manager
    seq = Sequence(-1, "probe", 0, list(prompt), GREEDY)
    return len(blocks.find_cached_prefix(seq)) * blocks.block_size


def test_eviction_with_a_tiny_cache_hits_only_what_survived(engines):
    block_size = 4
    engine = engines.get(block_size, num_blocks=20)
    reference = engines.get(block_size, caching=False)
    old = list(range(100, 121))  # 21 tokens: 5 full blocks
    expected_old = reference.generate(ids(old), GREEDY)[0]
    others = [[7, i, *range(200 + i, 214 + i)] for i in range(12)]  # distinct from the first token on
    expected_others = reference.generate([ids(p) for p in others], GREEDY)
    seen_full_hit = seen_miss = seen_partial = False
    for num_others in range(len(others) + 1):
        engine.reset_prefix_cache()
        assert_same_outputs(engine.generate(ids(old), GREEDY)[0], expected_old)
        evictions_before = engine.prefix_cache_stats.evictions
        for prompt, expected in zip(others[:num_others], expected_others):
            assert_same_outputs(engine.generate(ids(prompt), GREEDY)[0], expected)
        survived = probe(engine, old)
        again = engine.generate(ids(old), GREEDY)[0]
        assert again.num_cached_tokens == survived
        assert_same_outputs(again, expected_old)
        if survived == 20:
            seen_full_hit = True
        elif survived == 0:
            seen_miss = True
            assert engine.prefix_cache_stats.evictions > evictions_before
        else:
            seen_partial = True  # the least recently used go first: the old prompt's last blocks
    assert seen_full_hit and seen_miss and seen_partial


@st.composite
def request_mixes(draw):
    prefixes = [list(range(5, 5 + 9)), list(range(60, 60 + 6))]
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        prompt = draw(st.sampled_from(prefixes)) + draw(st.lists(st.integers(3, 300), max_size=6))
        params = SamplingParams(n=draw(st.integers(1, 3)), temperature=0, max_tokens=draw(st.integers(1, 10)), ignore_eos=True)
        # (prompt, params, steps to run after adding it, abort it then?)
        requests.append((prompt, params, draw(st.integers(0, 4)), draw(st.booleans())))
    return requests


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_mixes())
def test_reference_counts_never_leak(engines, mix):
    engine = engines.get(3, num_blocks=14)  # small enough that sequences get preempted
    generator = engine.generator
    blocks = generator.block_manager

    def check_every_block_accounted_for() -> None:
        in_use = {block for seq in generator.scheduler.running for block in seq.block_table}
        assert len(in_use) + blocks.num_free_blocks == blocks.num_blocks
        assert all(not seq.block_table for seq in generator.scheduler.waiting)

    request_ids = []
    for prompt, params, steps, abort in mix:
        request_ids.append(engine.add_request(ids(prompt), params))
        for _ in range(steps):
            generator.step()
            check_every_block_accounted_for()
        if abort:
            generator.abort_request(request_ids[-1])
            check_every_block_accounted_for()
    while generator.has_unfinished_requests():
        generator.step()
        check_every_block_accounted_for()
    assert blocks.num_free_blocks == blocks.num_blocks


def test_a_preempted_sequence_finds_its_own_blocks_again(engines):
    block_size = 4
    reference = engines.get(block_size, caching=False)
    prompts = [list(range(10, 30)), list(range(40, 61))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    expected = reference.generate([ids(p) for p in prompts], params)
    engine = engines.get(block_size, num_blocks=14)  # both fit at first, not once they have grown
    engine.reset_prefix_cache()
    stats = engine.prefix_cache_stats
    hits_before, preemptions_before = stats.hits, engine.generator.scheduler.stats.preemptions
    outputs = engine.generate([ids(p) for p in prompts], params)
    assert engine.generator.scheduler.stats.preemptions > preemptions_before
    assert stats.hits > hits_before  # recomputed from its own cached blocks, not from scratch
    for ours, theirs in zip(outputs, expected):
        assert_same_outputs(ours, theirs)


def test_turning_it_off_caches_nothing(engines):
    engine = engines.get(4, caching=False)
    prompt = ids(list(range(10, 50)))
    outputs = [engine.generate(prompt, GREEDY)[0] for _ in range(2)]
    assert [o.num_cached_tokens for o in outputs] == [0, 0]
    assert engine.generator.block_manager.num_cached_blocks == 0
    assert engine.prefix_cache_stats.queries == 0


def test_sliding_window_models_cache_exactly(tmp_path):
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint(str(tmp_path), "mistral", sliding_window=8)
    prompt = ids(list(range(20, 60)))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    with Engine.from_pretrained(str(tmp_path), block_size=4, enable_prefix_caching=False) as engine:
        expected = engine.generate(prompt, params)[0]
    with Engine.from_pretrained(str(tmp_path), block_size=4) as engine:
        engine.generate(prompt, params)
        again = engine.generate(prompt, params)[0]
    assert again.num_cached_tokens == 36
    assert_same_outputs(again, expected)


class FailOnDemand(LlamaModelRunner):
    fail = False

    def execute_model(self, model_input, kv_cache, intermediate=None):
        if FailOnDemand.fail:
            raise RuntimeError("this step fails")
        return super().execute_model(model_input, kv_cache, intermediate)


def test_a_failed_step_uncaches_only_the_blocks_it_was_to_fill(tiny_checkpoints):
    cached_prompt, failing_prompt = ids(list(range(10, 50))), ids(list(range(100, 140)))
    with Engine.from_pretrained(tiny_checkpoints("llama")[0], block_size=4, model_runner_cls=FailOnDemand) as engine:
        blocks = engine.generator.block_manager
        expected = engine.generate([cached_prompt, failing_prompt], GREEDY)
        engine.reset_prefix_cache()
        assert_same_outputs(engine.generate(cached_prompt, GREEDY)[0], expected[0])
        num_cached = blocks.num_cached_blocks
        FailOnDemand.fail = True
        try:
            with pytest.raises(RuntimeError, match="this step fails"):
                engine.generate(failing_prompt, GREEDY)
        finally:
            FailOnDemand.fail = False
        # The failed step's blocks were named before they were written: they are forgotten, the rest kept.
        assert blocks.num_cached_blocks == num_cached and is_idle(engine)
        again, failed_before = engine.generate([cached_prompt, failing_prompt], GREEDY)
        assert again.num_cached_tokens == 36 and failed_before.num_cached_tokens == 0
        assert_same_outputs(again, expected[0])
        assert_same_outputs(failed_before, expected[1])


QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two is further south?"]


def test_each_chat_turn_finds_the_conversation_so_far_in_the_cache(smollm2_engine):
    engine, block_size = smollm2_engine, smollm2_engine.config.block_size
    engine.reset_prefix_cache()  # the engine is the session's: earlier tests may have asked the same first question
    params = SamplingParams(temperature=0, max_tokens=24)
    messages: list[dict] = []
    previous: list[int] = []  # the last turn's prompt and answer, as the model saw them
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        prompt = engine.chat_prompt(messages)["prompt_token_ids"]
        # The template and the tokenizer's round trip leave the earlier turns' tokens as they were.
        assert prompt[: len(previous)] == previous
        answer = engine.chat(messages, params)
        # All of it but the answer's last token (sampled, never fed back) was computed: those full blocks hit.
        assert answer.num_cached_tokens == max(0, len(previous) - 1) // block_size * block_size
        previous = prompt + answer.token_ids
        messages.append({"role": "assistant", "content": answer.text})


def test_chat_cli_chat_reuses_the_conversation(smollm2_engine):
    import io

    from chat_cli.chat import run_chat
    from chat_cli.main import build_parser

    # A system prompt of its own: no earlier test cached the first turn.
    args = build_parser().parse_args(["chat", "--system", "Be terse; this is the CLI test.", "--temperature", "0", "--max-tokens", "24"])
    stats = smollm2_engine.prefix_cache_stats
    hits_before = stats.hits
    out = io.StringIO()
    run_chat(smollm2_engine, args, stdin=io.StringIO("\n".join(QUESTIONS) + "\n"), stdout=out)
    assert len(out.getvalue().strip().split("\n")) == len(QUESTIONS)
    # Turns 2 and 3 each found at least the first exchange (system prompt, question, answer: over 48 tokens).
    assert stats.hits - hits_before >= 2 * 48
