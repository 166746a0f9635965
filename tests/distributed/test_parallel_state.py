"""Process groups across real gloo ranks: rank layout, collectives, lifecycle; and the RankPool harness itself."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from chat_core.parallel import TensorParallelGroup
from chat_distributed.parallel_state import (
    GroupCoordinator,
    ParallelGroups,
    build_parallel_groups,
    destroy_distributed,
    get_world_group,
    init_distributed,
    is_initialized,
    new_group_coordinator,
)
from chat_distributed.testing import RankError, RankPool

CPU = torch.device("cpu")

# --- what runs on the ranks ---------------------------------------------------------------------------

_GROUPS: dict[str, ParallelGroups] = {}  # per rank process


def _view(group: GroupCoordinator) -> dict[str, Any]:
    return {
        "ranks": group.ranks,
        "rank": group.rank,
        "size": group.size,
        "is_first": group.is_first,
        "is_last": group.is_last,
        "first_rank": group.first_rank,
        "last_rank": group.last_rank,
        "next_rank": group.next_rank,
        "prev_rank": group.prev_rank,
        "is_tensor_parallel_group": isinstance(group, TensorParallelGroup),
        "shares_one_gloo_group": group.cpu_group is group.device_group,
    }


def _build(tp: int, pp: int) -> dict[str, Any]:
    groups = build_parallel_groups(tp, pp, CPU)
    _GROUPS["current"] = groups
    return {"rank": groups.rank, "world_size": groups.world_size, "tp": _view(groups.tp), "pp": _view(groups.pp), "world": _view(groups.world)}


def _rank_tensor(rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (2, 3, 4) tensor that differs on every rank."""
    return (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + 100 * rank).to(dtype)


def _collectives() -> dict[str, Any]:
    groups = _GROUPS["current"]
    mine = _rank_tensor(groups.rank)
    answers: dict[str, Any] = {}
    for name in ("tp", "pp", "world"):
        group: GroupCoordinator = getattr(groups, name)
        reduced_in = mine.clone()
        reduced = group.all_reduce(reduced_in)
        answers[f"{name}.all_reduce"] = reduced
        answers[f"{name}.all_reduce_in_place"] = reduced is reduced_in
        answers[f"{name}.all_reduce_bf16"] = group.all_reduce(_rank_tensor(groups.rank, torch.bfloat16))
        for dim in (0, 1, -1):
            answers[f"{name}.all_gather{dim}"] = group.all_gather(mine, dim=dim)
        answers[f"{name}.all_gather_transposed"] = group.all_gather(mine.transpose(0, 2), dim=-1)
    return answers


def _init_again(rank: int, world_size: int) -> str:
    try:
        init_distributed(rank=rank, world_size=world_size, init_method="file:///nonexistent/never-used", backend="gloo")
    except RuntimeError as error:
        return str(error)
    return "no-op"


def _bad_partition() -> str:
    with pytest.raises(ValueError, match="exactly once") as caught:
        new_group_coordinator([[0, 1], [2]], CPU)
    return str(caught.value)


def _bad_sizes() -> str:
    with pytest.raises(ValueError, match="must equal the world size 4") as caught:
        build_parallel_groups(3, 1, CPU)
    return str(caught.value)


def _raise(message: str) -> None:
    raise KeyError(message)


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _world_rank() -> int:
    return get_world_group().global_rank


# --- expectations -------------------------------------------------------------------------------------


def expected_groups(rank: int, tp: int, pp: int) -> dict[str, tuple[int, ...]]:
    stage, tp_rank = divmod(rank, tp)
    return {
        "tp": tuple(stage * tp + t for t in range(tp)),
        "pp": tuple(p * tp + tp_rank for p in range(pp)),
        "world": tuple(range(tp * pp)),
    }


def check_layout(answers: list[dict[str, Any]], tp: int, pp: int) -> None:
    for rank, answer in enumerate(answers):
        assert (answer["rank"], answer["world_size"]) == (rank, tp * pp)
        for name, ranks in expected_groups(rank, tp, pp).items():
            view = answer[name]
            index = ranks.index(rank)
            assert view["ranks"] == ranks, (rank, name)
            assert (view["rank"], view["size"]) == (index, len(ranks)), (rank, name)
            assert (view["is_first"], view["is_last"]) == (index == 0, index == len(ranks) - 1), (rank, name)
            assert (view["first_rank"], view["last_rank"]) == (ranks[0], ranks[-1]), (rank, name)
            assert view["next_rank"] == ranks[(index + 1) % len(ranks)], (rank, name)
            assert view["prev_rank"] == ranks[(index - 1) % len(ranks)], (rank, name)
            assert view["is_tensor_parallel_group"] and view["shares_one_gloo_group"], (rank, name)


def check_collectives(answers: list[dict[str, Any]], tp: int, pp: int) -> None:
    for rank, answer in enumerate(answers):
        for name, ranks in expected_groups(rank, tp, pp).items():
            members = [_rank_tensor(member) for member in ranks]
            assert torch.equal(answer[f"{name}.all_reduce"], sum(members)), (rank, name)
            assert answer[f"{name}.all_reduce_in_place"], (rank, name)
            bf16_sum = sum(_rank_tensor(member, torch.bfloat16).float() for member in ranks)
            torch.testing.assert_close(answer[f"{name}.all_reduce_bf16"].float(), bf16_sum, rtol=1e-2, atol=1)
            for dim in (0, 1, -1):
                assert torch.equal(answer[f"{name}.all_gather{dim}"], torch.cat(members, dim=dim)), (rank, name, dim)
            transposed = torch.cat([member.transpose(0, 2) for member in members], dim=-1)
            assert torch.equal(answer[f"{name}.all_gather_transposed"], transposed), (rank, name)


# --- tp=2 x pp=2 on 4 ranks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_ranks() -> Any:
    with RankPool(4, timeout=20.0, call_timeout=60.0) as pool:
        yield pool


def test_tp2_pp2_layout_puts_each_stage_on_contiguous_ranks(four_ranks: RankPool) -> None:
    check_layout(four_ranks.run(_build, 2, 2), tp=2, pp=2)


def test_tp2_pp2_collectives_reduce_and_gather_within_each_group(four_ranks: RankPool) -> None:
    four_ranks.run(_build, 2, 2)
    check_collectives(four_ranks.run(_collectives), tp=2, pp=2)


@pytest.mark.parametrize(("tp", "pp"), [(4, 1), (1, 4)])
def test_pure_tensor_or_pipeline_parallel_layouts(four_ranks: RankPool, tp: int, pp: int) -> None:
    check_layout(four_ranks.run(_build, tp, pp), tp=tp, pp=pp)
    check_collectives(four_ranks.run(_collectives), tp=tp, pp=pp)


def test_sizes_that_do_not_multiply_to_the_world_fail_on_every_rank(four_ranks: RankPool) -> None:
    for message in four_ranks.run(_bad_sizes):
        assert "tensor_parallel_size=3" in message


def test_a_partition_missing_a_rank_fails_on_every_rank(four_ranks: RankPool) -> None:
    for message in four_ranks.run(_bad_partition):
        assert "[[0, 1], [2]]" in message and "world of 4" in message


def test_init_distributed_again_is_a_no_op_unless_the_world_differs(four_ranks: RankPool) -> None:
    assert four_ranks.run(_init_again, 0, 4, ranks=[0]) == ["no-op"]
    [message] = four_ranks.run(_init_again, 0, 8, ranks=[0])
    assert "rank 0 of 4" in message and "rank 0 of 8" in message


# --- tp=2 on a world of 2, and the harness --------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks() -> Any:
    with RankPool(2, timeout=20.0, call_timeout=60.0) as pool:
        yield pool


def test_tp2_on_two_ranks(two_ranks: RankPool) -> None:
    check_layout(two_ranks.run(_build, 2, 1), tp=2, pp=1)
    check_collectives(two_ranks.run(_collectives), tp=2, pp=1)


def test_a_failing_call_reports_the_rank_and_its_traceback(two_ranks: RankPool) -> None:
    with pytest.raises(RankError, match="rank 1: _raise raised") as caught:
        two_ranks.run(_raise, "the reason", ranks=[1])
    assert "KeyError: 'the reason'" in str(caught.value) and "Traceback" in str(caught.value)
    assert two_ranks.run(_world_rank) == [0, 1]  # the ranks live on


def test_a_slow_call_times_out_and_its_late_answer_is_dropped(two_ranks: RankPool) -> None:
    two_ranks.submit(1, _sleep, 1.0)
    with pytest.raises(RankError, match=r"rank 1: no result from _sleep within 0.2s"):
        two_ranks.result(1, timeout=0.2)
    assert two_ranks.run(_sleep, 0.0, ranks=[1]) == [0.0]


def test_close_leaves_no_process_behind() -> None:
    pool = RankPool(1).start()
    processes = list(pool._processes)
    assert pool.run(_world_rank) == [0]
    pool.close()
    pool.close()
    assert not any(process.is_alive() for process in processes)


# --- without a process group --------------------------------------------------------------------------


def test_without_init_groups_are_an_error_and_destroy_is_a_no_op() -> None:
    assert not is_initialized()
    with pytest.raises(RuntimeError, match="call chat_distributed.init_distributed first"):
        build_parallel_groups(1, 1, CPU)
    with pytest.raises(RuntimeError, match="init_distributed"):
        get_world_group()
    destroy_distributed()
    destroy_distributed()
    assert not is_initialized()


def test_init_arguments_are_checked_before_anything_starts() -> None:
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size\)"):
        init_distributed(rank=2, world_size=2, init_method="file:///unused")
    with pytest.raises(ValueError, match="timeout must be a positive"):
        init_distributed(rank=0, world_size=2, init_method="file:///unused", timeout=0)
    assert not is_initialized()
