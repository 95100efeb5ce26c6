"""The grammar-backend seam: what the engine needs from a grammar engine, and its registry.

A backend compiles a `GuidedDecoding` for one tokenizer into a `GrammarMatcher`, which follows
a sequence's output token by token and writes the set of tokens allowed next as a bitmask
(32 tokens per int32, bit i of word w = token 32 w + i, the layout xgrammar and llguidance
share). Writing masks for many matchers at once is the backend's job too, so it may use its
own thread pool. lamina ships `llguidance` (guided/llguidance_backend.py); another engine
(xgrammar, outlines-core) plugs in with `register_grammar_backend` (guided/registry.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lamina.guided.spec import GuidedDecoding


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask."""
    return (vocab_size + 31) // 32


class GrammarMatcher(ABC):
    """One sequence's position in its grammar."""

    @abstractmethod
    def consume(self, token: int) -> bool:
        """Advance by a generated token; False when the grammar does not allow it."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` tokens (rejected speculative tokens)."""

    @abstractmethod
    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the tokens allowed next into `row` (int32 [words], contiguous, on the CPU)."""

    @abstractmethod
    def is_finished(self) -> bool:
        """Whether the grammar is complete and allows nothing but ending."""

    @abstractmethod
    def error(self) -> str | None:
        """Why the matcher stopped being usable (a limit hit, an impossible token), or None."""

    @abstractmethod
    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state (a forked sample)."""


class GrammarBackend(ABC):
    """Compiles constraints for one tokenizer and fills masks in batches."""

    name: str

    @abstractmethod
    def matcher(self, spec: GuidedDecoding) -> GrammarMatcher:
        """A fresh matcher for `spec`; ValueError naming the problem when it does not compile."""

    def fill_masks(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Row i of `bitmask` ([len(matchers), words] int32) gets matchers[i]'s mask."""
        for i, m in enumerate(matchers):
            m.fill_mask(bitmask[i])


@dataclass(frozen=True)
class TokenizerInfo:
    """What a backend needs of the tokenizer: its `tokenizers` JSON, the model's vocabulary
    width (logits may be wider than the tokenizer) and the ids that end a sequence."""

    tokenizer_json: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
