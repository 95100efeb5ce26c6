"""The offline API, named like vLLM's so users' code carries over:

llm = LLM("path/to/model-or.gguf")
outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lamina.config import CacheConfig, SchedulerConfig
from lamina.engine.beam_search import BeamSearchOutput, beam_search
from lamina.engine.llm_engine import LLMEngine
from lamina.kv.cache import num_blocks_for
from lamina.loading.loader import load_model
from lamina.outputs import RequestOutput
from lamina.sampling_params import BeamSearchParams, SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """Load a model and generate from batches of prompts through the continuous-batching engine.

    model: a Hugging Face folder, a .gguf file, or None for the default SmolLM2 GGUF.
    dtype: "auto" (bfloat16 where the CPU has native bf16 kernels, else float32), "float32",
        "bfloat16" or "float16".
    block_size / num_kv_blocks / kv_cache_bytes: paged KV cache geometry and budget.
    attention_sinks / sliding_window: StreamingLLM, keep the first S and the last W tokens of
        each request in the cache (blocks leaving the window are freed): bounded memory per
        request, unbounded length. max_model_len then defaults to 1M tokens.
    h2o_heavy / h2o_recent: H2O eviction, a per-request budget of the most recent tokens plus
        the heavy hitters (largest accumulated attention); off by default.
        h2o_cache_positions: rotate kept tokens at their rank among the kept ones (keys cached
        un-rotated, as StreamingLLM) instead of their true positions, so a request can
        outgrow the trained context.
    kv_cache_dtype: "auto" (the model dtype) or "int8" (per-token-per-head scales: ~3.8x the
        tokens of a float32 cache in the same bytes).
    rope_scaling: override the checkpoint's RoPE scheme, e.g. {"rope_type": "yarn", "factor": 4};
        the default max_model_len then grows by the factor.
    enable_prefix_caching: share cached KV blocks between requests with a common prefix.
    pack_weights: on CPU, keep float linears in oneDNN's packed layout (1.4-4x faster GEMMs at
        decode batch sizes; lamina/layers/linear.py). The model's `Linear.weight` then stays
        empty until `unpack()`.
    max_model_len: longest sequence (prompt + output); defaults to the model's trained context,
        or to what the KV cache holds if that is less.
    quantization: None (GGUF weights dequantized to `dtype`) or "gguf" (GGUF Q8_0 / Q4_0 /
        Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K decoder linears run natively on the int4 kernel, about
        a sixth of their float32 memory; other types stay float; a quantized token embedding
        is kept as the file's rows and dequantized per looked-up token).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype = "auto",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int = 1 << 30,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        rope_scaling: str | dict[str, Any] | None = None,
        kv_cache_dtype: str = "auto",
        attention_sinks: int = 0,
        sliding_window: int | None = None,
        h2o_heavy: int | None = None,
        h2o_recent: int | None = None,
        h2o_cache_positions: bool = False,
        quantization: str | None = None,
        pack_weights: bool = True,
    ) -> None:
        loaded = load_model(model, dtype, rope_scaling, quantization)
        cache = CacheConfig(
            block_size=block_size,
            num_blocks=num_kv_blocks,
            kv_cache_bytes=kv_cache_bytes,
            kv_cache_dtype=kv_cache_dtype,
            attention_sinks=attention_sinks,
            sliding_window=sliding_window,
            h2o_heavy=h2o_heavy,
            h2o_recent=h2o_recent,
            h2o_cache_positions=h2o_cache_positions,
        )
        rope = loaded.config.rope
        trained = loaded.config.max_position_embeddings
        if rope_scaling is not None and rope.rope_type != "default":
            trained = int(trained * rope.factor)  # the extended context the user asked for
        max_len = max_model_len or min(
            trained,
            num_blocks_for(loaded.config, cache, loaded.model.dtype) * block_size,
        )
        if (sliding_window is not None or h2o_heavy is not None) and max_model_len is None:
            max_len = 1 << 20  # length is no longer bounded by the cache
        self.engine = LLMEngine(
            loaded,
            cache,
            SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max(max_num_batched_tokens, 1),
                max_model_len=max_len,
            ),
            enable_prefix_caching=enable_prefix_caching,
            pack_weights=pack_weights,
        )
        self.tokenizer = loaded.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):  # noqa: ANN201 - vLLM name
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts."""
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        order: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, _prompt_input(prompt), p)
                order.append(rid)
            return self._run(order, use_tqdm)
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {
                "prompt_token_ids": self.tokenizer.apply_chat_template(
                    conv,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=True,
                    chat_template=chat_template,
                )
            }
            for conv in convs
        ]
        return self.generate(prompts, sampling_params, use_tqdm)  # type: ignore[arg-type]

    def beam_search(
        self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams | None = None
    ) -> list[BeamSearchOutput]:
        """Beam search (transformers' `num_beams` semantics) for each prompt; each output lists
        its finished beams best first. Runs on the engine's cache, one prompt at a time."""
        params = params or BeamSearchParams()
        outs = []
        for prompt in _prompt_list(prompts):
            p = _prompt_input(prompt)
            ids = self.tokenizer.encode(p) if isinstance(p, str) else p
            outs.append(beam_search(self.engine, ids, params))
        return outs

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(
            total=len(order), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True
        )
        stats = self.engine.stats
        p0, g0 = stats.prompt_tokens_computed, stats.generation_tokens
        t0 = stats.step_seconds
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
            elapsed = max(stats.step_seconds - t0, 1e-9)
            bar.set_postfix_str(
                f"input: {(stats.prompt_tokens_computed - p0) / elapsed:.1f} tok/s, "
                f"output: {(stats.generation_tokens - g0) / elapsed:.1f} tok/s",
                refresh=False,
            )
        bar.close()
        return [done[rid] for rid in order]


def _prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (text, token ids or a dict) or a sequence of them, as a list."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def _prompt_input(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return str(prompt["prompt"])
        raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    raise ValueError(
        f"unsupported prompt {type(prompt).__name__}; give a string, a list of token ids, "
        "or a dict with 'prompt' / 'prompt_token_ids'"
    )
