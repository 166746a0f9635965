"""An ExecuteModelRequest as the change since the previous step, for the SPMD control plane.

Rank 0 and every other rank keep the same record of running sequences (block table, sampling
params, seed, and for penalties the tokens so far). A sequence seen for the first time (or again
after preemption) is sent whole; afterwards only its new tokens, its new blocks and a few integers
go over the wire: a decode step costs a handful of numbers per sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from chat_core.engine.execute_model_request import ExecuteModelRequest, ScheduledSequence
from chat_core.sampling_params import SamplingParams


@dataclass
class _Known:
    block_table: list[int]
    sampling_params: SamplingParams
    seed: int | None
    prompt_token_ids: list[int] | None
    output_token_ids: list[int] | None


def _params_dict(params: SamplingParams) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


class RequestDeltaEncoder:
    """Rank 0's side: turns each request into the plain-value delta the other ranks can undo."""

    def __init__(self) -> None:
        self._known: dict[int, _Known] = {}

    def encode(self, request: ExecuteModelRequest) -> dict[str, Any]:
        for seq_id in request.finished_seq_ids:
            self._known.pop(seq_id, None)
        entries: list[Any] = []
        for seq in request.scheduled:
            known = self._known.get(seq.seq_id)
            if known is None or seq.block_table[: len(known.block_table)] != known.block_table:
                entries.append(self._whole(seq))
            else:
                new_outputs = None
                if seq.output_token_ids is not None and known.output_token_ids is not None:
                    new_outputs = seq.output_token_ids[len(known.output_token_ids) :]
                entries.append(
                    [
                        seq.seq_id,
                        seq.token_ids,
                        seq.start_position,
                        seq.block_table[len(known.block_table) :],
                        seq.do_sample,
                        seq.output_index,
                        new_outputs,
                    ]
                )
            self._known[seq.seq_id] = _Known(
                list(seq.block_table), seq.sampling_params, seq.seed, seq.prompt_token_ids, _copy(seq.output_token_ids)
            )
        return {"finished": list(request.finished_seq_ids), "seqs": entries}

    @staticmethod
    def _whole(seq: ScheduledSequence) -> dict[str, Any]:
        return {
            "id": seq.seq_id,
            "tokens": seq.token_ids,
            "start": seq.start_position,
            "blocks": seq.block_table,
            "params": _params_dict(seq.sampling_params),
            "sample": seq.do_sample,
            "seed": seq.seed,
            "out_idx": seq.output_index,
            "prompt": seq.prompt_token_ids,
            "output": seq.output_token_ids,
        }


class RequestDeltaDecoder:
    """The other ranks' side: rebuilds the full ExecuteModelRequest from a delta."""

    def __init__(self) -> None:
        self._known: dict[int, _Known] = {}

    def decode(self, delta: dict[str, Any]) -> ExecuteModelRequest:
        for seq_id in delta["finished"]:
            self._known.pop(seq_id, None)
        scheduled = []
        for entry in delta["seqs"]:
            if isinstance(entry, dict):
                seq = ScheduledSequence(
                    seq_id=entry["id"],
                    token_ids=list(entry["tokens"]),
                    start_position=entry["start"],
                    block_table=list(entry["blocks"]),
                    sampling_params=SamplingParams(**entry["params"]),
                    do_sample=entry["sample"],
                    seed=entry["seed"],
                    output_index=entry["out_idx"],
                    prompt_token_ids=entry["prompt"],
                    output_token_ids=entry["output"],
                )
            else:
                seq_id, tokens, start, new_blocks, do_sample, output_index, new_outputs = entry
                known = self._known[seq_id]
                seq = ScheduledSequence(
                    seq_id=seq_id,
                    token_ids=list(tokens),
                    start_position=start,
                    block_table=known.block_table + list(new_blocks),
                    sampling_params=known.sampling_params,
                    do_sample=do_sample,
                    seed=known.seed,
                    output_index=output_index,
                    prompt_token_ids=known.prompt_token_ids,
                    output_token_ids=None if new_outputs is None else (known.output_token_ids or []) + list(new_outputs),
                )
            self._known[seq.seq_id] = _Known(
                list(seq.block_table), seq.sampling_params, seq.seed, seq.prompt_token_ids, _copy(seq.output_token_ids)
            )
            scheduled.append(seq)
        return ExecuteModelRequest(scheduled=scheduled, finished_seq_ids=list(delta["finished"]))


def _copy(tokens: list[int] | None) -> list[int] | None:
    return None if tokens is None else list(tokens)
