"""Evaluation: sliding-window perplexity over the engine, on text installed at set-up time."""

from lamina.eval.corpus import CorpusNotFoundError, available_texts, load_corpus
from lamina.eval.perplexity import PerplexityResult, perplexity, sliding_windows

__all__ = [
    "CorpusNotFoundError",
    "PerplexityResult",
    "available_texts",
    "load_corpus",
    "perplexity",
    "sliding_windows",
]
