"""The proposer seam: guess each sequence's next tokens. A proposer only guesses; verification
by the target model (engine/output_processor.py) decides what is kept, so a bad proposer costs
speed, never correctness."""

from __future__ import annotations

from abc import ABC, abstractmethod

from lamina.engine.sequence import Sequence


class Proposer(ABC):
    name: str
    needs_hidden = False  # True: the engine keeps each sequence's last hidden state for it

    @abstractmethod
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """Up to num_tokens[i] guessed next tokens of seqs[i] (fewer or none when it has no
        good guess). A proposer that guesses deterministically (a point-mass proposal) keeps
        verification exact for sampling too: the target then samples each position as usual
        and keeps the guess when the sample equals it."""
