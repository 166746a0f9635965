"""After each step: append the sampled tokens, detokenize incrementally, decide which sequences stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chat_core.engine.sequence import Sequence
from chat_core.outputs import CompletionOutput, Logprob, RequestOutput, SamplerOutput
from chat_core.sampling_params import SamplingParams


@dataclass
class CompletionState:
    """Text state of one sequence: what was decoded, and how much of it may be shown yet."""

    seq: Sequence
    detokenizer: Any | None  # IncrementalDetokenizer, or None without a tokenizer
    text: str = ""
    visible_len: int = 0  # characters that can no longer turn out to be part of a stop string

    def completion(self) -> CompletionOutput:
        seq = self.seq
        return CompletionOutput(
            index=seq.index,
            text=self.text[: self.visible_len],
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if seq.sampling_params.logprobs is not None else None,
            top_logprobs=list(seq.top_logprobs) if seq.sampling_params.logprobs else None,
        )


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.seq.is_finished for c in self.completions)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[c.completion() for c in self.completions],
            finished=self.finished,
            num_cached_tokens=self.completions[0].seq.num_cached_tokens or 0,
        )


class OutputProcessor:
    def __init__(self, tokenizer: Any | None, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def append_tokens(
        self, output: SamplerOutput, states: dict[int, CompletionState]
    ) -> list[tuple[CompletionState, str | None, str | int | None]]:
        """Add each sampled token to its sequence; returns (state, finish reason, stop reason) per sequence."""
        token_ids = output.sampled_token_ids.tolist()
        chosen = output.sampled_logprobs.tolist() if output.sampled_logprobs is not None else None
        top_ids = output.top_token_ids.tolist() if output.top_token_ids is not None else None
        top_values = output.top_logprobs.tolist() if output.top_logprobs is not None else None
        results = []
        for row, (seq_id, token) in enumerate(zip(output.seq_ids, token_ids)):
            state = states[seq_id]
            seq = state.seq
            seq.output_token_ids.append(token)
            if seq.sampling_params.logprobs is not None and chosen is not None:
                # Asked before the token is pushed: where its text will start (see Logprob.text_offset).
                offset = state.detokenizer.next_offset if state.detokenizer is not None else 0
                seq.logprobs.append(self._logprob(token, chosen[row], text_offset=offset))
                if seq.sampling_params.logprobs > 0 and top_ids is not None and top_values is not None:
                    k = seq.sampling_params.logprobs
                    seq.top_logprobs.append(
                        [self._logprob(t, v) for t, v in zip(top_ids[row][:k], top_values[row][:k])]
                    )
            results.append((state, *self._check_stop(state, token)))
        return results

    def _logprob(self, token_id: int, value: float, text_offset: int | None = None) -> Logprob:
        """`token_id`'s entry, with its own bytes: decoding it alone would turn part of a character into U+FFFD."""
        raw = self.tokenizer.token_bytes(token_id) if self.tokenizer is not None else b""
        return Logprob(token_id, value, raw.decode("utf-8", errors="replace"), raw, text_offset)

    def _check_stop(self, state: CompletionState, token: int) -> tuple[str | None, str | int | None]:
        seq, params = state.seq, state.seq.sampling_params
        num_generated = len(seq.output_token_ids)
        is_eos = not params.ignore_eos and token in self.eos_token_ids
        is_stop_token = token in params.stop_token_ids
        if not (is_eos or is_stop_token) and state.detokenizer is not None:
            found = self._add_text(state, state.detokenizer.push(token), params)
            if found is not None:
                return "stop", found
        if is_eos or is_stop_token:
            reason: tuple[str | None, str | int | None] = ("stop", token if is_stop_token else None)
        elif (params.max_tokens is not None and num_generated >= params.max_tokens) or seq.num_tokens >= self.max_model_len:
            reason = ("length", None)
        else:
            hold_back = max((len(s) for s in params.stop), default=1) - 1
            state.visible_len = max(state.visible_len, len(state.text) - hold_back)
            return None, None
        return self._finish_text(state, params, reason)

    def _finish_text(
        self, state: CompletionState, params: SamplingParams, reason: tuple[str | None, str | int | None]
    ) -> tuple[str | None, str | int | None]:
        """Add the bytes the detokenizer still holds and show all the text; returns the finish reason.

        Generation can end inside a character (at max_tokens, or a stop token after half of one);
        the final text is then what decoding all output ids at once gives (as Hugging Face and vLLM
        return): the unfinished character as U+FFFD, rather than silently dropping the token's bytes.
        """
        if state.detokenizer is not None:
            found = self._add_text(state, state.detokenizer.flush(), params)
            if found is not None:
                return "stop", found
        state.visible_len = len(state.text)
        return reason

    @staticmethod
    def _add_text(state: CompletionState, new_text: str, params: SamplingParams) -> str | None:
        """Append detokenized text; returns the stop string found in it (the text is then cut there), if any."""
        state.text += new_text
        if params.stop and new_text:
            return OutputProcessor._find_stop_string(state, len(new_text), params)
        return None

    @staticmethod
    def _find_stop_string(state: CompletionState, new_chars: int, params: SamplingParams) -> str | None:
        """Look for a stop string ending in the new text; cut the text at the first (it is never shown)."""
        matches = []
        for stop in params.stop:
            at = state.text.find(stop, max(0, len(state.text) - new_chars - len(stop) + 1))
            if at != -1:
                matches.append((at, stop))
        if not matches:
            return None
        at, stop = min(matches)
        end = at + len(stop) if params.include_stop_str_in_output else at
        state.text = state.text[:end]
        state.visible_len = end
        return stop
