"""The grammar backend over llguidance (Microsoft's guidance engine in Rust; vLLM's "guidance"
backend). It was chosen over xgrammar because it has no Python dependencies (xgrammar pulls in
`transformers` and `triton` at run time), builds a tokenizer from the `tokenizers` JSON lamina
already holds (GGUF vocabularies included), and computes a 49k-token mask in ~0.2 ms.

Compiling = building a matcher (grammar parsed, lexer built) once per distinct constraint; each
request then gets a `deep_copy` of that pristine matcher, so a schema used again costs nothing.
"""

from __future__ import annotations

import importlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from lamina.cpu import usable_cores
from lamina.guided.backend import (
    GrammarBackend,
    GrammarMatcher,
    TokenizerInfo,
)
from lamina.guided.spec import GuidedDecoding

llg: Any
try:
    llg = importlib.import_module("llguidance")
except ImportError:  # pragma: no cover - a dependency; the error says how to get it
    llg = None

# JSON as json.dumps writes it: `{"a": 1, "b": [2, 3]}`
_SPACED_JSON: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
CACHE_SIZE = 256  # distinct constraints kept compiled


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def consume(self, token: int) -> bool:
        return bool(self.inner.consume_token(token))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and not self.inner.rollback(num_tokens):
            raise ValueError(f"cannot roll the grammar back by {num_tokens} tokens")

    def fill_mask(self, row: torch.Tensor) -> None:
        self.inner.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def is_finished(self) -> bool:
        return bool(self.inner.is_stopped())

    def error(self) -> str | None:
        return str(self.inner.get_error()) if self.inner.is_error() else None

    def copy(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.inner.deep_copy())


def grammar_text(spec: GuidedDecoding) -> str:
    """llguidance's grammar for a constraint."""
    assert llg is not None
    options = None if spec.whitespace_flexible else _SPACED_JSON
    if spec.json is not None or spec.json_object:
        schema = {"type": "object"} if spec.json_object else spec.json
        try:
            return str(llg.LLMatcher.grammar_from_json_schema(schema, defaults=options))
        except ValueError as e:
            raise ValueError(f"guided json schema is invalid: {e}") from e
    if spec.regex is not None:  # \d, \w, \s are ASCII classes, as in JavaScript / JSON Schema
        pattern = llg.regex_to_lark(spec.regex, "dw")
        return str(llg.LLMatcher.grammar_from_lark(f"start: /{pattern}/"))
    if spec.choice is not None:
        return str(llg.grammar_from("choice", list(spec.choice)))  # type: ignore[arg-type]
    assert spec.grammar is not None
    try:
        return str(llg.grammar_from("grammar", spec.grammar))  # GBNF or Lark
    except ValueError as e:
        raise ValueError(f"guided grammar is invalid: {e}") from e


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, info: TokenizerInfo) -> None:
        if llg is None:
            raise ValueError(
                "guided decoding needs the llguidance package (pip install llguidance)"
            )
        self.tokenizer = llg.LLTokenizer(
            info.tokenizer_json, n_vocab=info.vocab_size, eos_token=list(info.eos_token_ids)
        )
        # masks of a batch are filled on every usable core (llguidance's default takes 80%,
        # one of two): in the sampler the model's threads are idle
        self.executor = llg.LLExecutor(num_threads=usable_cores())
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, spec: GuidedDecoding) -> LLGuidanceMatcher:
        key = spec.key()
        with self._lock:
            pristine = self._compiled.get(key)
            if pristine is not None:
                self._compiled.move_to_end(key)
                return LLGuidanceMatcher(pristine.deep_copy())
        pristine = llg.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
        if pristine.is_error():
            raise ValueError(f"guided {spec.kind} does not compile: {pristine.get_error()}")
        with self._lock:
            self._compiled[key] = pristine
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return LLGuidanceMatcher(pristine.deep_copy())

    def fill_masks(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """All rows at once on llguidance's own threads (the GIL is released)."""
        assert bitmask.is_contiguous()
        assert bitmask.dtype == torch.int32
        pairs = [(m.inner, i) for i, m in enumerate(matchers)]  # type: ignore[attr-defined]
        if pairs:
            words = bitmask.shape[1]
            self.executor.unsafe_compute_mask_ptr(
                pairs, bitmask.data_ptr(), words * 4, bitmask.shape[0]
            )
