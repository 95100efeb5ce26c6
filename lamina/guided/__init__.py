"""Structured output: constraining a request's tokens to a JSON schema, regex, choice or grammar.

`spec.GuidedDecoding` is what a request asks for; `backend.GrammarBackend` is the seam to a
grammar engine (llguidance ships, `llguidance_backend.py`); `processor.GrammarProcessor` is the
sampler's logits-processor stage that applies the masks.
"""

from lamina.guided.spec import GuidedDecoding

__all__ = ["GuidedDecoding"]
