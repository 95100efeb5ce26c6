"""The logits-processor stage of the sampler: each processor changes the batch's logits for
the rows whose settings ask for it, before temperature and the draw (so greedy obeys them too).

A processor is one small object (`LogitsProcessor`); the sampler runs its list in order. Hard
processors (allowed_token_ids, a grammar) say what may be generated at all and run first;
soft ones (bad words, logit bias, min_tokens, penalties) steer within that. When the soft ones
leave a row no token at all (min_tokens blocking the EOS that a finished grammar requires, a
bad word that was the only allowed token), that row falls back to its hard constraints alone:
the output stays well-formed rather than becoming an arbitrary token.

Processors see `Sequence`s, so they read per-request state (output so far, tokenized bad
words, a grammar matcher) without the sampler knowing about any of it. `accept` lets a
stateful processor follow each generated token, and `prepare` lets it start work for the next
step (the grammar processor computes next masks while the model runs).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from lamina.engine.sequence import Sequence


class LogitsProcessor:
    """One stage. `__call__` returns the (new, or the same) logits [B, V]; it must not write
    into the tensor it was given (it may be the model's distribution, kept for logprobs)."""

    hard = False  # True: what may be generated at all (kept when soft stages leave nothing)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        raise NotImplementedError

    def accept(self, seq: Sequence, token: int) -> str | None:
        """`token` was generated for `seq`; a finish reason when `seq` must now end ("stop":
        its constraint is complete; "abort": the constraint broke), else None."""
        return None

    def prepare(self, seqs: list[Sequence]) -> None:
        """`seqs` will likely sample next step: start what can be done ahead."""


class AllowedTokens(LogitsProcessor):
    """SamplingParams.allowed_token_ids: every other id gets -inf."""

    hard = True

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.sampling_params.allowed_token_ids is not None]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            allowed = torch.tensor(seqs[i].sampling_params.allowed_token_ids or [])
            kept = logits[i, allowed]
            logits[i] = float("-inf")
            logits[i, allowed] = kept
        return logits


def bad_word_bans(seq: Sequence) -> list[int]:
    """The tokens `seq` may not generate next (vLLM's bad_words): the last token of each bad
    word's token sequence whose other tokens end the output so far (a one-token word always)."""
    out = seq.output_token_ids
    bans = []
    for word in seq.bad_words_ids:
        head = len(word) - 1
        if head == 0 or (head <= len(out) and out[len(out) - head :] == word[:-1]):
            bans.append(word[-1])
    return bans


class BadWords(LogitsProcessor):
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        banned = [
            (i, ids) for i, s in enumerate(seqs) if s.bad_words_ids and (ids := bad_word_bans(s))
        ]
        if not banned:
            return logits
        logits = logits.clone()
        for i, ids in banned:
            logits[i, torch.tensor(ids)] = float("-inf")
        return logits


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: one scatter-add for the whole batch."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for i, s in enumerate(seqs):
            for tok, bias in (s.sampling_params.logit_bias or {}).items():
                rows.append(i)
                cols.append(tok)
                values.append(bias)
        if not rows:
            return logits
        logits = logits.clone()
        logits.index_put_(
            (torch.tensor(rows), torch.tensor(cols)),
            torch.tensor(values, dtype=logits.dtype),
            accumulate=True,
        )
        return logits


class MinTokens(LogitsProcessor):
    """EOS and stop ids are blocked until min_tokens tokens are generated."""

    def __init__(self, eos_token_ids: Collection[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        blocked = [
            i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.sampling_params.min_tokens
        ]
        if not blocked:
            return logits
        logits = logits.clone()
        for i in blocked:
            params = seqs[i].sampling_params
            stop_ids = set(params.stop_token_ids or [])
            if not params.ignore_eos:
                stop_ids.update(self.eos_token_ids)
            if stop_ids:
                logits[i, torch.tensor(sorted(stop_ids))] = float("-inf")
        return logits


class Penalties(LogitsProcessor):
    """Repetition (CTRL/transformers, over prompt + output) and frequency / presence (OpenAI,
    over the output)."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if not any(s.sampling_params.has_penalties for s in seqs):
            return logits
        return apply_penalties(logits, seqs, logits.shape[-1])


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], vocab: int) -> torch.Tensor:
    """The penalties on [B, V] logits, as a new tensor."""
    rows = len(seqs)
    out_counts = torch.zeros(rows, vocab, dtype=logits.dtype)
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    for i, seq in enumerate(seqs):
        if seq.output_token_ids:
            ids = torch.tensor(seq.output_token_ids)
            out_counts[i].index_add_(0, ids, torch.ones(len(ids), dtype=logits.dtype))
        if seq.sampling_params.repetition_penalty != 1.0:
            seen[i, torch.tensor(seq.token_ids)] = True
    rep = torch.tensor([s.sampling_params.repetition_penalty for s in seqs], dtype=logits.dtype)
    rep = rep.unsqueeze(1)
    penalized = torch.where(logits < 0, logits * rep, logits / rep)
    logits = torch.where(seen, penalized, logits)
    freq = torch.tensor([s.sampling_params.frequency_penalty for s in seqs], dtype=logits.dtype)
    pres = torch.tensor([s.sampling_params.presence_penalty for s in seqs], dtype=logits.dtype)
    return logits - freq.unsqueeze(1) * out_counts - pres.unsqueeze(1) * (out_counts > 0)


def default_processors(eos_token_ids: Collection[int]) -> list[LogitsProcessor]:
    """The built-in stages, in vLLM's order."""
    return [AllowedTokens(), BadWords(), LogitBias(), MinTokens(eos_token_ids), Penalties()]


def run_processors(
    processors: list[LogitsProcessor], logits: torch.Tensor, seqs: list[Sequence]
) -> torch.Tensor:
    """Hard stages, then soft ones; a row the soft stages emptied keeps the hard result."""
    hard = logits
    for p in processors:
        if p.hard:
            hard = p(hard, seqs)
    out = hard
    for p in processors:
        if not p.hard:
            out = p(out, seqs)
    if out is not hard:
        dead = torch.isneginf(out).all(dim=-1)
        if bool(dead.any()):
            out = torch.where(dead.unsqueeze(1), hard, out)
    return out
