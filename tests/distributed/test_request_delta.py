"""The SPMD control plane's request deltas decode back to exactly the request that was encoded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chat_core import ExecuteModelRequest, SamplingParams, ScheduledSequence
from chat_distributed.request_delta import RequestDeltaDecoder, RequestDeltaEncoder

params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    top_k=st.integers(0, 50),
    seed=st.none() | st.integers(0, 2**31),
    repetition_penalty=st.sampled_from([1.0, 1.2]),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
)


@st.composite
def step_sequences(draw):
    """A few steps of a scheduler's life: sequences start (some from cached blocks), grow (tokens and blocks),
    finish, get preempted."""
    live: dict[int, dict] = {}
    next_id = 0
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        finished = [seq_id for seq_id in list(live) if draw(st.booleans()) and draw(st.booleans())]
        for seq_id in finished:
            if draw(st.booleans()):
                del live[seq_id]
            else:  # preempted: it starts again, from those of its own first blocks the prefix cache kept
                seq = live[seq_id]
                kept = draw(st.integers(0, len(seq["blocks"])))
                seq["blocks"], seq["pos"] = seq["blocks"][:kept], kept * 4
        for _ in range(draw(st.integers(0, 3))):
            params = draw(params_strategy)
            # A prefix-cache hit: a new sequence may start with another's first blocks, past position 0.
            source = draw(st.sampled_from([None, *live]))
            shared = live[source]["blocks"][: draw(st.integers(0, 3))] if source is not None else []
            live[next_id] = {
                "params": params,
                "seed": params.seed,
                "blocks": list(shared),
                "pos": len(shared) * 4,
                "prompt": draw(st.lists(st.integers(0, 999), min_size=1, max_size=6)),
                "output": [],
            }
            next_id += 1
        scheduled = []
        for seq_id, seq in live.items():
            if not draw(st.booleans()):
                continue  # not scheduled this step
            tokens = draw(st.lists(st.integers(0, 999), min_size=1, max_size=4))
            seq["blocks"] = seq["blocks"] + draw(st.lists(st.integers(0, 99), max_size=2))
            penalties = seq["params"].uses_penalties
            scheduled.append(
                ScheduledSequence(
                    seq_id=seq_id,
                    token_ids=tokens,
                    start_position=seq["pos"],
                    block_table=list(seq["blocks"]),
                    sampling_params=seq["params"],
                    do_sample=draw(st.booleans()),
                    seed=seq["seed"],
                    output_index=len(seq["output"]),
                    prompt_token_ids=seq["prompt"] if penalties else None,
                    output_token_ids=list(seq["output"]) if penalties else None,
                )
            )
            seq["pos"] += len(tokens)
            seq["output"].append(tokens[-1])
        steps.append(ExecuteModelRequest(scheduled=scheduled, finished_seq_ids=finished))
    return steps


@settings(max_examples=150, deadline=None)
@given(step_sequences())
def test_every_request_round_trips(steps):
    encoder, decoder = RequestDeltaEncoder(), RequestDeltaDecoder()
    for request in steps:
        assert decoder.decode(encoder.encode(request)) == request


def test_a_decode_step_sends_only_what_changed():
    encoder = RequestDeltaEncoder()
    first = ScheduledSequence(7, list(range(100)), 0, list(range(7)), SamplingParams(temperature=0.5, stop=("x",)), True, seed=3)
    encoder.encode(ExecuteModelRequest([first]))
    delta = encoder.encode(ExecuteModelRequest([ScheduledSequence(7, [42], 100, list(range(7)), first.sampling_params, True, seed=3, output_index=1)]))
    assert delta == {"finished": [], "seqs": [[7, [42], 100, [], True, 1, None]]}


def test_a_sequence_that_starts_from_cached_blocks_carries_its_start_and_shared_blocks():
    encoder, decoder = RequestDeltaEncoder(), RequestDeltaDecoder()
    params = SamplingParams(temperature=0)
    first = ScheduledSequence(1, list(range(20)), 0, [0, 1, 2, 3, 4], params, True)
    decoder.decode(encoder.encode(ExecuteModelRequest([first])))
    # Sequence 2 found sequence 1's four full blocks in the prefix cache: it computes from position 16.
    request = ExecuteModelRequest(
        [ScheduledSequence(1, [99], 20, [0, 1, 2, 3, 4], params, True, output_index=1), ScheduledSequence(2, [7, 8], 16, [0, 1, 2, 3, 9], params, True)]
    )
    delta = encoder.encode(request)
    assert delta["seqs"][0] == [1, [99], 20, [], True, 1, None]
    assert delta["seqs"][1]["start"] == 16 and delta["seqs"][1]["blocks"] == [0, 1, 2, 3, 9]
    assert decoder.decode(delta) == request
