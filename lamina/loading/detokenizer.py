"""Streaming detokenization that never splits a UTF-8 character.

A byte-level or byte-fallback token can hold part of a character (emoji, CJK), so decoding one
token at a time would print U+FFFD. We decode a small window of recent tokens instead and only
emit once its text no longer ends in U+FFFD (vLLM's prefix/read offset technique). The window
starts a few tokens back so decoders that strip a leading space (SentencePiece) see the same
context as a full decode would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    """What streaming needs of a tokenizer: ids -> text. Stated here, so this module depends on
    no tokenizer class (lamina.loading.tokenizer.Tokenizer satisfies it and builds detokenizers)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class NoText:
    """The decoder of an engine without a tokenizer (skip_tokenizer_init): every id decodes to
    "", so a detokenizer built on it streams no text and the output is token ids alone."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return ""


NO_TEXT = NoText()

_REPLACEMENT = "\ufffd"
# How far before the end of the prompt the first window starts (vLLM uses the same value).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Streams text for a growing list of token ids without emitting broken characters."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        # ids[prefix_offset:read_offset] is the window whose text has already been emitted.
        self.prefix_offset = max(len(self.ids) - _PROMPT_CONTEXT, 0)
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:stop], self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text that became printable (possibly "")."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or the last character is still incomplete
        chunk = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += chunk
        return chunk

    def flush(self) -> str:
        """At the end of the stream: emit whatever is held back, even an incomplete character."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        chunk = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += chunk
        return chunk
