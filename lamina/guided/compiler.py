"""The engine's side of guided decoding: its grammar backend (made on the first constrained
request, so an engine that never sees one never builds the grammar engine's tokenizer) and the
logits processor that applies the masks."""

from __future__ import annotations

import threading
from collections.abc import Callable

from lamina.guided.backend import (
    GrammarBackend,
    GrammarMatcher,
    TokenizerInfo,
)
from lamina.guided.processor import GrammarProcessor
from lamina.guided.registry import make_grammar_backend
from lamina.guided.spec import GuidedDecoding


class GrammarCompiler:
    def __init__(
        self, backend_name: str, tokenizer_info: Callable[[], TokenizerInfo], vocab_size: int
    ) -> None:
        """`tokenizer_info` is called once, when the backend is first needed (it may raise a
        ValueError: an engine without a tokenizer cannot constrain text)."""
        self.backend_name = backend_name
        self._tokenizer_info = tokenizer_info
        self._backend: GrammarBackend | None = None
        self._lock = threading.Lock()  # the server compiles on worker threads too
        self.processor = GrammarProcessor(self.backend, vocab_size)

    def backend(self) -> GrammarBackend:
        with self._lock:
            if self._backend is None:
                self._backend = make_grammar_backend(self.backend_name, self._tokenizer_info())
            return self._backend

    def matcher(self, spec: GuidedDecoding) -> GrammarMatcher:
        """A fresh matcher for a request (compiled once per distinct constraint); ValueError
        naming the problem when the constraint does not compile."""
        return self.backend().matcher(spec)
