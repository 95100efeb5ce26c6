"""Whether an engine runs batch-invariant, and with which attention backend.

`batch_invariant` is "auto" by default: on wherever it can be, because it costs nothing
measurable here (README, benchmarks/results/README.md#batch-invariance) and makes greedy and
seeded outputs independent of the batch. Where it cannot be (another attention backend was asked
for, StreamingLLM / H2O, quantized weights, a device or build without the exact kernel) "auto"
turns it off and logs why; "on" (or True) refuses those with an error instead, and "off" (or
False) never turns it on.
"""

from __future__ import annotations

import logging

from lamina.attention.exact import ExactAttentionBackend
from lamina.kv.retention import RetentionAttention
from lamina.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def normalize_mode(value: bool | str) -> str:
    """ "auto" / "on" / "off" from a mode or a boolean (True is "on", False is "off")."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value in MODES:
        return str(value)
    raise ValueError(f"batch_invariant={value!r} is invalid; accepted: auto, on, off, True, False")


def resolve_batch_invariance(
    mode: bool | str,
    attention_backend: str,
    model: LlamaForCausalLM,
    retention: type[RetentionAttention] | None,
) -> tuple[bool, str]:
    """(whether the engine runs batch-invariant, the attention backend it then asks for)."""
    mode = normalize_mode(mode)
    if mode == "off":
        return False, attention_backend
    why_not = _obstacle(attention_backend, model, retention)
    if why_not is None:
        return True, ExactAttentionBackend.name
    if mode == "on":
        raise ValueError(why_not)
    log.info("batch invariance is off: %s", why_not)
    return False, attention_backend


def _obstacle(
    attention_backend: str, model: LlamaForCausalLM, retention: type[RetentionAttention] | None
) -> str | None:
    """Why this engine cannot be batch-invariant (an error message), or None when it can."""
    if attention_backend not in ("auto", ExactAttentionBackend.name):
        return (
            f"batch_invariant runs the 'exact' attention backend; attention_backend="
            f"{attention_backend!r} cannot be combined with it (give auto or exact)"
        )
    if retention is not None:
        return (
            "batch_invariant needs dense attention; sliding_window / attention_sinks (StreamingLLM)"
            " and H2O cannot be combined with it"
        )
    if model.quant_config is not None or model.gguf_native or model.awq_native:
        return (
            "batch_invariant is made and tested for float weights; this model is quantized "
            "(load it without quantization, or drop batch_invariant)"
        )
    device = model.embed_tokens.device
    reason = ExactAttentionBackend.unavailable_reason(device)
    if reason is not None:
        return (
            f"batch_invariant needs the 'exact' attention backend, not available on {device}: "
            f"{reason}"
        )
    return None
