"""Prompt lookup decoding (Saxena 2023; vLLM's "ngram"): the output's last n tokens occurred
earlier in the prompt or output; guess that what followed them then follows again. Free (no
model), and strong where outputs copy their input: rewriting, summarising, code editing."""

from __future__ import annotations

import numpy as np

from lamina.engine.sequence import Sequence
from lamina.spec.proposer import Proposer


def lookup(tokens: np.ndarray, k: int, n_max: int, n_min: int) -> list[int]:
    """The k tokens that followed the latest earlier occurrence of `tokens`' last n-gram,
    trying n from n_max down to n_min; [] when none recurs."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        tail = tokens[length - n :]
        # windows[i] = tokens[i : i + n], for starts whose n-gram ends before the tail does
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, n_max: int, n_min: int) -> None:
        self.n_max = n_max
        self.n_min = n_min

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        return [
            lookup(np.asarray(s.token_ids), k, self.n_max, self.n_min) if k > 0 else []
            for s, k in zip(seqs, num_tokens)
        ]
