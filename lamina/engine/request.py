"""A request: one prompt, its sequences (n / best_of samples, or live beams), their text, and its
output shape.

Its `kind` says what the engine does with the logits of its sequences (see
engine/output_processor.py): "sample" draws tokens, "beam" runs a beam search, "score" hands
every prompt position's hidden state to a consumer and generates nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lamina.engine.beam_search import BeamGroup
from lamina.engine.sequence import Sequence, make_generator
from lamina.guided.backend import GrammarMatcher
from lamina.loading.detokenizer import NO_TEXT, IncrementalDetokenizer
from lamina.loading.tokenizer import Tokenizer
from lamina.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
)
from lamina.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer | None  # None: the engine runs on token ids alone (no text)
    seqs: list[Sequence] = field(default_factory=list)
    detokenizers: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    prompt_logprobs: PromptLogprobs | None = None
    # the sampling seed of its samples (sample i draws from derive_seed(seed, i)): the params'
    # own seed, or the one the engine derived from its engine seed; None: OS entropy
    seed: int | None = None
    bad_words_ids: list[list[int]] = field(default_factory=list)  # params.bad_words, tokenized
    grammar: GrammarMatcher | None = None  # params.guided, compiled: the first sample's matcher
    # times on the monotonic clock (see `metrics`)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each step added a token
    finished_time: float | None = None
    _epoch: float = field(default=0.0, init=False, repr=False)  # epoch - monotonic seconds
    forked: bool = False  # whether best_of > 1 samples have been split off yet
    kind: str = "sample"
    beam: BeamGroup | None = None  # kind "beam": the search's state
    # kind "score": receives (first position, hidden states [n, hidden]) of each fed chunk
    on_hidden: Callable[[int, torch.Tensor], None] | None = None
    num_scored: int = 0  # kind "score": prompt positions handed over so far

    def __post_init__(self) -> None:
        self._epoch = time.time() - time.monotonic()  # monotonic -> epoch seconds
        if self.seed is None:
            self.seed = self.params.seed
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no context
        first = Sequence(
            self.request_id,
            self.prompt_token_ids,
            self.params,
            index=0,
            generator=make_generator(self.seed, 0),
            bad_words_ids=self.bad_words_ids,
            grammar=self.grammar,
        )
        self.add_seq(first)
        self.forked = self.params.best_of == 1

    def add_seq(self, seq: Sequence) -> None:
        self.seqs.append(seq)
        self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer or NO_TEXT, self.prompt_token_ids, self.params.skip_special_tokens
        )

    @property
    def finished(self) -> bool:
        return self.forked and all(s.is_finished for s in self.seqs)

    def metrics(self) -> RequestMetrics:
        """vLLM's RequestMetrics, in epoch seconds."""

        def epoch(t: float | None) -> float | None:
            return None if t is None else t + self._epoch

        arrival = self.arrival_time + self._epoch
        scheduled = epoch(self.first_scheduled_time)
        last = self.token_times[-1] + self._epoch if self.token_times else arrival
        return RequestMetrics(
            arrival_time=arrival,
            last_token_time=last,
            first_scheduled_time=scheduled,
            first_token_time=epoch(self.first_token_time),
            time_in_queue=None if scheduled is None else scheduled - arrival,
            finished_time=epoch(self.finished_time),
        )

    def decoded(self, token_id: int) -> str | None:
        """A token's text for logprobs; None without a tokenizer (as vLLM's decoded_token)."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprob_entry(
        self, token: int, logprob: float, rank: int | None, top: list[tuple[int, float]] | None
    ) -> dict[int, Logprob]:
        """vLLM's per-position dict: the token itself plus the top-N, each with rank and text."""
        entry = {token: Logprob(logprob, rank, self.decoded(token))}
        for r, (tid, lp) in enumerate(top or [], start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, r, self.decoded(tid))
        return entry

    def output(self) -> RequestOutput:
        if self.beam is not None:
            return self._beam_output()
        seqs = self.seqs
        n = self.params.n
        if self.finished and len(seqs) > n:  # best_of: keep the n most likely samples
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:n]
        outs = [
            CompletionOutput(
                index=i,
                text=s.text,
                token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=None if s.logprobs is None else list(s.logprobs),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(seqs[:n] if not self.finished else seqs)
        ]
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            outs,
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=seqs[0].num_cached_tokens,
            metrics=self.metrics(),
        )

    def _beam_output(self) -> RequestOutput:
        """The finished beams, best first (empty until the search ends)."""
        assert self.beam is not None
        done = self.finished
        outs = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(b.token_ids) if done and self.tokenizer else "",
                token_ids=list(b.token_ids),
                cumulative_logprob=b.cumulative_logprob,
                finish_reason=b.finish_reason,
            )
            for i, b in enumerate(self.beam.finished if done else [])
        ]
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            outs,
            finished=done,
            metrics=self.metrics(),
        )
