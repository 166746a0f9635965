"""broadcast_tensor_dict, send_tensor_dict and recv_tensor_dict across real gloo ranks (spawned processes)."""

from __future__ import annotations

import os
import time
from fractions import Fraction
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_distributed.communication import (
    broadcast_tensor_dict,
    communication_stats,
    recv_tensor_dict,
    reset_communication_stats,
    send_tensor_dict,
)
from chat_distributed.parallel_state import GroupCoordinator, get_world_group, new_group_coordinator
from chat_distributed.testing import RankError, RankPool

WORLD_SIZE = 3
PAIR = (0, 2)  # a 2-rank subgroup; rank 1 is alone in its own group

# --- what runs on the ranks (module-level, so the spawned processes can import it) ---------------------

_GROUPS: dict[str, GroupCoordinator] = {}  # per rank process, filled by _make_groups


def _make_groups() -> None:
    _GROUPS["world"] = get_world_group()
    _GROUPS["pair"] = new_group_coordinator([list(PAIR), [1]], torch.device("cpu"))


def _broadcast(src: int, tensor_dict: dict[str, Any] | None, group_name: str | None) -> dict[str, Any]:
    group = _GROUPS[group_name] if group_name else None
    out = broadcast_tensor_dict(tensor_dict, src=src, group=group)
    return {"same_object": out is tensor_dict, "received": None if out is tensor_dict else out}


def _send(tensor_dict: dict[str, Any], dst: int) -> None:
    send_tensor_dict(tensor_dict, dst=dst)


def _recv(src: int) -> dict[str, Any]:
    return recv_tensor_dict(src=src)


def _broadcast_counting(src: int, tensor_dict: dict[str, Any] | None) -> Any:
    reset_communication_stats()
    broadcast_tensor_dict(tensor_dict, src=src)
    return communication_stats()


def _broadcast_catching(src: int, tensor_dict: dict[str, Any] | None, group_name: str | None = None) -> tuple[str, str, float]:
    began = time.monotonic()
    try:
        _broadcast(src, tensor_dict, group_name)
    except Exception as error:  # the test inspects which error, and how fast
        return type(error).__name__, str(error), time.monotonic() - began
    return "no error", "", time.monotonic() - began


def _exit_now() -> None:
    os._exit(0)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


# --- tensors and values -------------------------------------------------------------------------------

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
]  # fmt: skip
LAYOUTS = ["contiguous", "transposed", "strided", "expanded", "offset"]


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], layout: str, seed: int) -> torch.Tensor:
    """A tensor of `shape` whose memory layout is `layout` (a view of a bigger or differently shaped base)."""
    generator = torch.Generator().manual_seed(seed)

    def filled(base_shape: tuple[int, ...]) -> torch.Tensor:
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(base_shape, generator=generator, dtype=torch.float64 if dtype.is_floating_point else dtype).to(dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, base_shape, generator=generator).bool()
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, base_shape, generator=generator, dtype=dtype)

    if layout == "transposed" and len(shape) >= 2:
        return filled((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "strided" and shape:
        return filled((2 * shape[0] + 1, *shape[1:]))[::2]
    if layout == "expanded" and shape:
        return filled((1, *shape[1:])).expand(shape)
    if layout == "offset" and shape:
        return filled((shape[0] + 2, *shape[1:]))[2:]
    return filled(shape)


tensors = st.builds(
    make_tensor,
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from(LAYOUTS),
    st.integers(0, 2**31 - 1),
)
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
values = st.one_of(
    tensors,
    tensors,  # twice: most values of a real input dict are tensors
    plain_values,
    st.lists(tensors | plain_values, max_size=3),
    st.dictionaries(st.text(max_size=3), tensors | plain_values, max_size=2),
    st.tuples(tensors, plain_values),
)
tensor_dicts = st.dictionaries(st.text(max_size=8), values, max_size=6)

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_same(expected: Any, actual: Any, where: str = "tensor_dict") -> None:
    """Equal values of the same types, dicts in the same key order, tensors equal in dtype, shape and data."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        assert actual.device == expected.device, f"{where}: device {actual.device} != {expected.device}"
        assert torch.equal(actual, expected), f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for index, (want, got) in enumerate(zip(expected, actual)):
            assert_same(want, got, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# --- the ranks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Any:
    with RankPool(WORLD_SIZE, timeout=20.0, call_timeout=60.0) as ranks:
        ranks.run(_make_groups)
        yield ranks


def broadcast_everywhere(pool: RankPool, tensor_dict: dict[str, Any], src: int, ranks: tuple[int, ...], group_name: str | None) -> None:
    answers = pool.run_each({rank: (_broadcast, src, tensor_dict if rank == src else None, group_name) for rank in ranks})
    assert answers[src]["same_object"], "the sender must get its own dict back"
    for rank in ranks:
        if rank != src:
            assert_same(tensor_dict, answers[rank]["received"], f"rank {rank}: tensor_dict")


@PROPERTY
@given(tensor_dict=tensor_dicts, src=st.integers(0, WORLD_SIZE - 1))
def test_broadcast_over_the_world_gives_every_rank_an_equal_dict(pool: RankPool, tensor_dict: dict[str, Any], src: int) -> None:
    broadcast_everywhere(pool, tensor_dict, src, tuple(range(WORLD_SIZE)), group_name=None)


@PROPERTY
@given(tensor_dict=tensor_dicts, src=st.sampled_from(PAIR))
def test_broadcast_within_a_subgroup_takes_global_src(pool: RankPool, tensor_dict: dict[str, Any], src: int) -> None:
    broadcast_everywhere(pool, tensor_dict, src, PAIR, group_name="pair")


@PROPERTY
@given(tensor_dict=tensor_dicts, pair=st.permutations(range(WORLD_SIZE)).map(lambda ranks: ranks[:2]))
def test_send_then_recv_gives_an_equal_dict(pool: RankPool, tensor_dict: dict[str, Any], pair: list[int]) -> None:
    src, dst = pair
    answers = pool.run_each({src: (_send, tensor_dict, dst), dst: (_recv, src)})
    assert_same(tensor_dict, answers[dst])


def test_a_group_of_one_returns_the_same_object(pool: RankPool) -> None:
    answer = pool.run_each({1: (_broadcast, 1, {"x": torch.ones(2)}, "pair")})[1]
    assert answer["same_object"]


def test_stats_count_one_metadata_message_and_each_non_empty_tensor(pool: RankPool) -> None:
    tensor_dict = {"ids": torch.arange(5), "empty": torch.empty(0, 4), "mask": torch.ones(3, dtype=torch.bool), "n": 7}
    stats = pool.run_each({rank: (_broadcast_counting, 0, tensor_dict if rank == 0 else None) for rank in range(WORLD_SIZE)})
    for rank, counted in stats.items():
        assert (counted.metadata_messages, counted.tensor_messages, counted.tensor_bytes) == (1, 2, 5 * 8 + 3), rank
        assert counted.metadata_bytes > 0 and counted.collectives == 3


def test_a_sender_with_a_bad_value_fails_everywhere_instead_of_hanging(pool: RankPool) -> None:
    bad = {"ok": torch.ones(1), "bad": [1, {"deep": Fraction(1, 3)}]}
    answers = pool.run_each({rank: (_broadcast_catching, 0, bad if rank == 0 else None) for rank in range(WORLD_SIZE)})
    kind, message, _ = answers[0]
    assert kind == "TypeError" and "tensor_dict['bad'][1]['deep']" in message and "fractions.Fraction" in message
    for rank in (1, 2):
        kind, message, _ = answers[rank]
        assert kind == "CommunicationError" and "rank 0" in message and "tensor_dict['bad'][1]['deep']" in message
    # The world is still usable afterwards: the failure was reported, not half-sent.
    broadcast_everywhere(pool, {"after": torch.arange(3)}, 0, tuple(range(WORLD_SIZE)), None)


def test_src_outside_the_group_is_a_value_error(pool: RankPool) -> None:
    kind, message, _ = pool.run_each({0: (_broadcast_catching, 1, {}, "pair")})[0]
    assert kind == "ValueError" and "src=1" in message and "[0, 2]" in message


# --- without a process group --------------------------------------------------------------------------


def test_without_a_process_group_broadcast_returns_the_same_object() -> None:
    assert not dist.is_initialized()
    tensor_dict = {"x": torch.ones(2, 3).t(), "meta": [1, None, {"a": (2.5, "s")}]}
    assert broadcast_tensor_dict(tensor_dict) is tensor_dict
    assert broadcast_tensor_dict(tensor_dict, src=0) is tensor_dict


def test_without_a_process_group_bad_values_still_fail() -> None:
    with pytest.raises(TypeError, match=r"tensor_dict\['a'\]\[0\] is a builtins.object"):
        broadcast_tensor_dict({"a": [object()]})
    with pytest.raises(TypeError, match="keys must be str"):
        broadcast_tensor_dict({1: torch.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="needs a process group"):
        send_tensor_dict({}, dst=1)


# --- dead and hung peers: each test breaks its world, so it gets its own ----------------------------

PEER_TIMEOUT_S = 3.0


@pytest.mark.parametrize("dead", [0, 2], ids=["dead-sender", "dead-receiver"])
def test_broadcast_with_a_dead_rank_raises_promptly(dead: int) -> None:
    src, live = 0, [rank for rank in range(3) if rank != dead]
    with RankPool(3, timeout=PEER_TIMEOUT_S, call_timeout=30.0) as pool:
        pool.submit(dead, _exit_now)
        with pytest.raises(RankError, match=f"rank {dead}: process exited with code 0"):
            pool.result(dead, timeout=10.0)
        began = time.monotonic()
        answers = pool.run_each({rank: (_broadcast_catching, src, {"x": torch.ones(4)} if rank == src else None) for rank in live})
        assert time.monotonic() - began < PEER_TIMEOUT_S + 5.0
        for rank, (kind, message, elapsed) in answers.items():
            assert elapsed < PEER_TIMEOUT_S + 1.0, (rank, elapsed)
            # A receiver may already hold everything when the sender notices a dead peer; the sender may not.
            if rank == src or dead == src:
                assert kind == "CommunicationError" and f"from rank {src}" in message, (rank, kind, message)


def test_broadcast_from_a_silent_rank_times_out() -> None:
    with RankPool(2, timeout=PEER_TIMEOUT_S, call_timeout=30.0) as pool:
        pool.submit(0, _sleep, PEER_TIMEOUT_S + 1.0)  # alive, but never joins the broadcast
        kind, message, elapsed = pool.run_each({1: (_broadcast_catching, 0, None)})[1]
        assert kind == "CommunicationError" and "from rank 0" in message, message
        assert PEER_TIMEOUT_S * 0.5 < elapsed < PEER_TIMEOUT_S + 3.0
