"""Batched sampling over rows that each carry their own settings.

Order (as vLLM): logprobs of the model's own distribution are taken first; then the
logits-processor stage (engine/logits_processors.py: allowed token ids, a grammar, bad words,
logit bias, min_tokens blocking and penalties; these also steer greedy); then temperature,
min_p, top-k and top-p; then a draw. The draw is an exponential race (argmax of
p / E, E ~ Exp(1), picks i with probability p_i) whose noise comes from each sequence's own
generator, so a seeded request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from lamina.engine.logits_processors import (
    LogitsProcessor,
    default_processors,
    run_processors,
)
from lamina.engine.sequence import Sequence


@dataclass
class SampleResult:
    token: int
    logprob: float  # of the chosen token under the model's distribution
    rank: int | None = None  # 1 = most likely; only computed when logprobs are asked for
    top: list[tuple[int, float]] | None = None  # top-N (id, logprob), most likely first


def top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's min-p set, top-k and top-p nucleus.

    top_k 0, top_p 1 and min_p 0 disable their filter for that row. top-p keeps the smallest
    set of most likely tokens whose probability reaches top_p (the top token is always kept).
    """
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    drop = ranks >= k
    if bool((top_p < 1).any()):
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        limit = torch.where(top_p < 1, top_p, torch.full_like(top_p, float("inf")))
        drop |= mass_before >= limit.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __init__(
        self,
        eos_token_ids: Collection[int] = (),
        processors: list[LogitsProcessor] | None = None,
    ) -> None:
        """`processors`: the logits-processor stage; by default the built-in ones
        (`default_processors`)."""
        self.processors = (
            default_processors(eos_token_ids) if processors is None else list(processors)
        )

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """One token per row of float32 logits [B, V]; row i belongs to seqs[i]."""
        params = [s.sampling_params for s in seqs]
        logprobs = logits.log_softmax(dim=-1)
        logits = self._steer(logits, seqs)
        tokens = logits.argmax(dim=-1)
        if not all(p.greedy for p in params):
            tokens = torch.where(
                torch.tensor([p.greedy for p in params]), tokens, self._draw(logits, seqs)
            )
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        ranks: dict[int, int] = {}
        tops: dict[int, list[tuple[int, float]]] = {}
        if want:
            sub = logprobs[want]
            rank_t = (sub > chosen[want].unsqueeze(1)).sum(dim=-1) + 1
            n_top = max(params[i].logprobs or 0 for i in want)
            top_v, top_i = sub.topk(max(n_top, 1), dim=-1)
            for j, i in enumerate(want):
                ranks[i] = int(rank_t[j])
                n = params[i].logprobs or 0
                tops[i] = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist()))
        token_list, chosen_list = tokens.tolist(), chosen.tolist()
        return [
            SampleResult(token_list[i], chosen_list[i], ranks.get(i), tops.get(i))
            for i in range(len(seqs))
        ]

    def _steer(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits-processor stage: what changes greedy too (engine/logits_processors.py)."""
        return run_processors(self.processors, logits, seqs)

    def accept(self, seq: Sequence, token: int) -> str | None:
        """Tell every processor that `token` was generated for `seq`; the first finish reason
        one of them gives (the sequence must end), else None."""
        reasons = [p.accept(seq, token) for p in self.processors]
        return next((r for r in reasons if r is not None), None)

    def prepare(self, seqs: list[Sequence]) -> None:
        for p in self.processors:
            p.prepare(seqs)

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.sampling_params for s in seqs]
        temps = torch.tensor(
            [p.temperature if not p.greedy else 1.0 for p in params], dtype=logits.dtype
        )
        scaled = logits / temps.unsqueeze(1)
        top_k = torch.tensor([p.top_k for p in params])
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype)
        if bool((top_k > 0).any()) or bool((top_p < 1).any()) or bool((min_p > 0).any()):
            scaled = top_k_top_p_min_p(scaled, top_k, top_p, min_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=seq.generator)
        return (probs / noise).argmax(dim=-1)
