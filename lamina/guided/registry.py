"""Grammar backends by name: the built-in one and any registered with
`register_grammar_backend` (EngineConfig.guided_decoding_backend picks one)."""

from __future__ import annotations

from collections.abc import Callable

from lamina.guided.backend import GrammarBackend, TokenizerInfo
from lamina.guided.llguidance_backend import LLGuidanceBackend

BackendFactory = Callable[[TokenizerInfo], GrammarBackend]
_BACKENDS: dict[str, BackendFactory] = {"llguidance": LLGuidanceBackend}


def register_grammar_backend(name: str, factory: BackendFactory) -> None:
    """Make `factory(tokenizer info)` the backend called `name`."""
    _BACKENDS[name] = factory


def make_grammar_backend(name: str, info: TokenizerInfo) -> GrammarBackend:
    """The registered backend `name` for this tokenizer."""
    if name not in _BACKENDS:
        raise ValueError(
            f"grammar backend {name!r} is not registered; registered: {sorted(_BACKENDS)}"
        )
    return _BACKENDS[name](info)
