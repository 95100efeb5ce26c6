"""lamina: an LLM inference engine for LLaMA-family models.

Public API (vLLM-compatible names): LLM, SamplingParams, RequestOutput, CompletionOutput,
and GuidedDecoding (structured output, vLLM's StructuredOutputsParams).
"""

from lamina.guided.spec import GuidedDecoding
from lamina.llm import LLM
from lamina.outputs import CompletionOutput, RequestOutput
from lamina.sampling_params import BeamSearchParams, SamplingParams

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "GuidedDecoding",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"
