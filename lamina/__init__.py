"""lamina: an LLM inference engine for LLaMA-family models.

Public API (vLLM-compatible names): LLM, SamplingParams, RequestOutput, CompletionOutput.
"""

from lamina.llm import LLM
from lamina.outputs import CompletionOutput, RequestOutput
from lamina.sampling_params import BeamSearchParams, SamplingParams

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"
