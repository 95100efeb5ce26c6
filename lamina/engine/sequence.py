"""A sequence: one prompt plus the tokens generated for it, and where its KV lives."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lamina.outputs import SampleLogprobs
from lamina.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lamina.guided.backend import GrammarMatcher

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's finalizer (Steele, Lea, Flood 2014): a bijection of 64-bit integers whose
    outputs for neighbouring inputs look unrelated."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, index: int) -> int:
    """A 64-bit seed for stream `index` of `seed` (any Python ints). The pair is hashed, not
    added: with `seed + index`, sample 1 of seed 1 was sample 0 of seed 2. Sample streams of a
    request (index = sample index) and per-request seeds of an engine seed (index = request
    number) both come from here."""
    return splitmix64(splitmix64(seed & _MASK64) ^ (index & _MASK64))


def make_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """Per-sample RNG: seeded requests are reproducible whatever else is batched; sample
    `index` of a request draws from the stream `derive_seed(seed, index)`. (torch's CPU
    generator keeps 32 bits of a seed, so two different pairs share a stream with probability
    2**-32, without any structure.)"""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(derive_seed(seed, index))
    return g


@dataclass(eq=False)
class Sequence:
    """Token ids, block table and decoding state of one generated continuation.

    `num_computed_tokens` counts tokens whose K/V are already in the cache; the scheduler feeds
    the rest (a prompt chunk, or the newest token) in the next step.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    index: int = 0  # which of the request's samples this is
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks, in order
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose prefill the prefix cache saved
    num_evicted_blocks: int = 0  # blocks dropped from the front by a retention policy
    kv_state: Any = None  # the retention policy's per-sequence bookkeeping (kv/retention.py)
    max_chunk: int | None = None  # most tokens fed in one step (prompt scoring in chunks)
    reads_every_position: bool = False  # prompt scoring: no position may come from the cache
    beam_logprobs: torch.Tensor | None = None  # a beam's next-token logprobs, until its step
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""  # detokenized output (stop strings already cut)
    cumulative_logprob: float = 0.0
    logprobs: SampleLogprobs | None = None
    generator: torch.Generator | None = None
    # SamplingParams.bad_words as token id sequences (tokenized once, when the request is added)
    bad_words_ids: list[list[int]] = field(default_factory=list)
    num_preemptions: int = 0
    # Dynamic NTK: the sequence length whose base all its tokens use, fixed at admission (None:
    # the trained base); also salts its prefix-cache hashes. See lamina/layers/rotary.py.
    rope_len: int | None = None
    grammar: GrammarMatcher | None = None  # guided decoding: where the output is in its grammar
    # speculative decoding: tokens guessed to follow, fed this step after the real ones and
    # verified from their logits (never part of token_ids until accepted)
    spec_tokens: list[int] = field(default_factory=list)
    spec_result: tuple[int, int] | None = None  # (guessed, kept) of its last verification
    # the final hidden state of the row that gave the newest token, kept only for proposers
    # that read it (Medusa heads)
    last_hidden: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)
        if self.generator is None:
            self.generator = make_generator(self.sampling_params.seed, self.index)
        if self.sampling_params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    def fed_tokens(self, start: int, n: int) -> list[int]:
        """The `n` tokens fed from position `start`: known tokens, then guessed ones."""
        tokens = self.token_ids[start : start + n]
        if len(tokens) < n:
            tokens += self.spec_tokens[: n - len(tokens)]
        return tokens

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def fork(self, index: int, block_table: list[int]) -> Sequence:
        """A sibling sample that shares everything computed so far (blocks are ref-counted by
        the caller) and draws from its own RNG stream."""
        child = Sequence(
            self.request_id,
            self.prompt_token_ids,
            self.sampling_params,
            index=index,
            block_table=block_table,
            block_hashes=list(self.block_hashes),
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            num_evicted_blocks=self.num_evicted_blocks,
            status=self.status,
            text=self.text,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            bad_words_ids=self.bad_words_ids,
            rope_len=self.rope_len,
            grammar=None if self.grammar is None else self.grammar.copy(),
        )
        child.output_token_ids = list(self.output_token_ids)
        child.token_ids = list(self.token_ids)
        return child
