"""Turns the last-token logits of each sampled sequence into the next token.

Order: log-probs of the raw distribution (when asked) -> penalties -> greedy, or temperature ->
top-k / top-p / min-p -> a draw. The draw is `argmax(probs / E)` with E ~ Exp(1) (equivalent to
sampling from `probs`); a seeded sequence takes E from its own generator, seeded by its seed and
how many tokens it has generated, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chat_core.engine.execute_model_request import ScheduledSequence
from chat_core.outputs import SamplerOutput
from chat_core.tensor_dict import TensorDictMixin

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, step) pairs over the generator's seed space


@dataclass(frozen=True)
class SamplingTensors(TensorDictMixin):
    """Per-row sampling settings of one step, on the device; plain values where the host needs them."""

    temperature: torch.Tensor  # [rows] float32; 0 means greedy
    top_p: torch.Tensor  # [rows] float32
    top_k: torch.Tensor  # [rows] int64; 0 means off
    min_p: torch.Tensor  # [rows] float32
    seeds: list[int | None]
    output_indices: list[int]
    num_top_logprobs: int  # -1: no logprobs; 0: the chosen token's only; k: also the top k
    all_greedy: bool
    any_filter: bool
    repetition_penalty: torch.Tensor | None = None  # [rows]; None when no row uses penalties
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    prompt_tokens: torch.Tensor | None = None  # [rows, longest prompt], padded with vocab_size
    output_tokens: torch.Tensor | None = None  # [rows, longest output], padded with vocab_size

    @classmethod
    def from_scheduled(cls, rows: list[ScheduledSequence], vocab_size: int, device: torch.device) -> SamplingTensors:
        from chat_core.worker.input_staging import InputStaging

        return cls.from_staged(InputStaging(torch.device(device)).stage(cls.host_arrays(rows, vocab_size)), rows)

    @staticmethod
    def host_arrays(rows: list[ScheduledSequence], vocab_size: int) -> dict[str, np.ndarray]:
        """The per-row settings as host arrays, to be staged with the rest of a step's inputs (one copy)."""
        params = [row.sampling_params for row in rows]
        arrays = {
            "sampling.temperature": np.array([p.temperature for p in params], dtype=np.float32),
            "sampling.top_p": np.array([p.top_p for p in params], dtype=np.float32),
            "sampling.top_k": np.array([p.top_k for p in params], dtype=np.int64),
            "sampling.min_p": np.array([p.min_p for p in params], dtype=np.float32),
        }
        if any(p.uses_penalties for p in params):

            def padded(token_lists: list[list[int]]) -> np.ndarray:
                out = np.full((len(token_lists), max(1, max(len(t) for t in token_lists))), vocab_size, dtype=np.int64)
                for row, tokens in enumerate(token_lists):
                    out[row, : len(tokens)] = tokens
                return out

            arrays["sampling.repetition_penalty"] = np.array([p.repetition_penalty for p in params], dtype=np.float32)
            arrays["sampling.presence_penalty"] = np.array([p.presence_penalty for p in params], dtype=np.float32)
            arrays["sampling.frequency_penalty"] = np.array([p.frequency_penalty for p in params], dtype=np.float32)
            arrays["sampling.prompt_tokens"] = padded([row.prompt_token_ids or [] for row in rows])
            arrays["sampling.output_tokens"] = padded([row.output_token_ids or [] for row in rows])
        return arrays

    @classmethod
    def from_staged(cls, staged: dict[str, torch.Tensor], rows: list[ScheduledSequence]) -> SamplingTensors:
        """The tensors `host_arrays` made, once on the device, with the plain values the host needs."""
        params = [row.sampling_params for row in rows]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=staged["sampling.temperature"],
            top_p=staged["sampling.top_p"],
            top_k=staged["sampling.top_k"],
            min_p=staged["sampling.min_p"],
            seeds=[row.seed for row in rows],
            output_indices=[row.output_index for row in rows],
            num_top_logprobs=max(logprobs) if logprobs else -1,
            all_greedy=all(p.greedy for p in params),
            any_filter=any(p.top_p < 1 or p.top_k > 0 or p.min_p > 0 for p in params),
            repetition_penalty=staged.get("sampling.repetition_penalty"),
            presence_penalty=staged.get("sampling.presence_penalty"),
            frequency_penalty=staged.get("sampling.frequency_penalty"),
            prompt_tokens=staged.get("sampling.prompt_tokens"),
            output_tokens=staged.get("sampling.output_tokens"),
        )


class Sampler:
    def __call__(self, logits: torch.Tensor, seq_ids: list[int], t: SamplingTensors) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if t.num_top_logprobs >= 0 else None
        if t.repetition_penalty is not None:
            logits = apply_penalties(logits, t)
        greedy_tokens = logits.argmax(dim=-1)
        if t.all_greedy:
            tokens = greedy_tokens
        else:
            temperature = torch.where(t.temperature == 0, torch.ones_like(t.temperature), t.temperature)
            logits = logits / temperature.unsqueeze(1)
            if t.any_filter:
                logits = apply_top_k_top_p_min_p(logits, t.top_k, t.top_p, t.min_p)
            probs = torch.softmax(logits, dim=-1)
            sampled = (probs / exponential_noise(probs, t.seeds, t.output_indices)).argmax(dim=-1)
            tokens = torch.where(t.temperature == 0, greedy_tokens, sampled)

        if raw_logprobs is None:
            return SamplerOutput(seq_ids=seq_ids, sampled_token_ids=tokens)
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        if t.num_top_logprobs > 0:
            top_values, top_ids = raw_logprobs.topk(t.num_top_logprobs, dim=-1)
            return SamplerOutput(seq_ids, tokens, chosen, top_ids, top_values)
        return SamplerOutput(seq_ids, tokens, chosen)


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties, as in vLLM."""
    rows, vocab = logits.shape

    def counts(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)
        return out.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=logits.dtype))[:, :vocab]

    output_counts = counts(t.output_tokens)
    seen = (counts(t.prompt_tokens) > 0) | (output_counts > 0)
    rep = t.repetition_penalty.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - t.frequency_penalty.unsqueeze(1) * output_counts
    return logits - t.presence_penalty.unsqueeze(1) * (output_counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside a row's top-k, outside its top-p nucleus, or below min_p x the best."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth_best = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
    remove = sorted_logits < kth_best
    sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    remove |= sorted_probs.cumsum(dim=-1) <= (1 - top_p).unsqueeze(1)
    remove |= sorted_probs < (min_p.unsqueeze(1) * sorted_probs[:, -1:])
    remove[:, -1] = False  # the most likely token always stays
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))


def exponential_noise(probs: torch.Tensor, seeds: list[int | None], output_indices: list[int]) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for row, (seed, step) in enumerate(zip(seeds, output_indices)):
        if seed is not None:
            generator = torch.Generator(device=probs.device)
            generator.manual_seed((seed * _SEED_MIX + step) % (2**63))
            noise[row].exponential_(generator=generator)
    return noise
