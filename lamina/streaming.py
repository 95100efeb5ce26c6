"""Stream one request's text as it is generated, with prompt/decode speed for the CLI."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

from lamina.engine.llm_engine import LLMEngine
from lamina.outputs import RequestOutput
from lamina.sampling_params import SamplingParams

_ids = itertools.count()


@dataclass
class StreamStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str | None = None

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.time_to_first_token if self.time_to_first_token else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1  # the first token came with the prompt pass
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop string (so must not be shown)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def stream_deltas(
    engine: LLMEngine,
    prompt: str | list[int],
    params: SamplingParams,
    stats: StreamStats | None = None,
) -> Iterator[str]:
    """Yield new text for one request step by step; never a broken character or a piece of a
    stop string that is later cut. Aborts the request if the consumer stops early."""
    rid = f"stream-{next(_ids)}"
    engine.add_request(rid, prompt, params)
    start = time.perf_counter()
    first: float | None = None
    shown = 0
    out: RequestOutput | None = None
    try:
        while out is None or not out.finished:
            for o in engine.step():
                if o.request_id == rid:
                    out = o
            if out is None or not out.outputs[0].token_ids:
                continue
            if first is None:
                first = time.perf_counter()
            text = out.outputs[0].text
            end = (
                len(text) if out.finished else len(text) - stop_holdback(text, params.stop_strings)
            )
            if end > shown:
                yield text[shown:end]
                shown = end
    finally:
        if out is None or not out.finished:
            engine.abort(rid)
    if stats is not None and out is not None:
        now = time.perf_counter()
        stats.prompt_tokens = len(out.prompt_token_ids)
        stats.generated_tokens = len(out.outputs[0].token_ids)
        stats.time_to_first_token = (first or now) - start
        stats.decode_seconds = now - (first or now)
        stats.finish_reason = out.outputs[0].finish_reason
