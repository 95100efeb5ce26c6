"""The offline API, named like vLLM's so users' code carries over:

llm = LLM("path/to/model-or.gguf")
outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from tqdm.auto import tqdm

from lamina.engine.beam_search import BeamSearchOutput, BeamSearchSequence
from lamina.engine.llm_engine import LLMEngine
from lamina.engine_config import EngineConfig, resolve_max_model_len
from lamina.kv.cache import num_blocks_for
from lamina.loading.chat_template import validate_messages
from lamina.loading.loader import load_model
from lamina.loading.tokenizer import Tokenizer
from lamina.outputs import RequestOutput
from lamina.sampling_params import BeamSearchParams, SamplingParams
from lamina.spec.config import SpeculativeConfig

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """Load a model and generate from batches of prompts through the continuous-batching engine.

    `LLM(model, **kwargs)`: model is a Hugging Face folder, a .gguf file, None for the default
    SmolLM2 GGUF, or a whole `EngineConfig` (kwargs then override its fields). The keyword
    arguments are exactly `EngineConfig`'s fields (lamina/engine_config.py), whose help texts
    document them and are the `lamina run --help` flags:
    dtype; block_size / num_kv_blocks / kv_cache_bytes (paged KV cache geometry and budget);
    max_model_len (default: the trained context, or what the cache holds if less);
    max_num_seqs / max_num_batched_tokens (batching); enable_prefix_caching; rope_scaling
    (e.g. {"rope_type": "yarn", "factor": 4}); kv_cache_dtype ("auto" or "int8");
    attention_sinks / sliding_window (StreamingLLM) or h2o_heavy / h2o_recent /
    h2o_cache_positions (H2O); quantization (None or "gguf"); pack_weights; attention_backend;
    seed (requests without their own); tokenizer (another folder's); skip_tokenizer_init
    (vLLM's: load no tokenizer, so prompts must be token ids and outputs carry token_ids with
    text ""; stop strings, bad_words and chat are refused, stop_token_ids work); enforce_eager and
    gpu_memory_utilization (vLLM's, accepted and without effect on CPU).
    An unknown keyword raises a TypeError listing the accepted ones. The validated settings are
    kept as `self.config`.
    """

    def __init__(self, model: str | Path | EngineConfig | None = None, **kwargs: Any) -> None:
        if isinstance(model, EngineConfig):
            config = model.replace(**kwargs)
        else:
            config = EngineConfig.from_kwargs(model=model, **kwargs)
        self.config = config
        loaded = load_model(
            config.model,
            config.dtype,
            config.rope_scaling,
            config.quantization,
            config.tokenizer,
            skip_tokenizer_init=config.skip_tokenizer_init,
        )
        cache = config.cache_config()
        cache_tokens = num_blocks_for(loaded.config, cache, loaded.model.dtype) * cache.block_size
        max_len = resolve_max_model_len(config, loaded.config, cache_tokens)
        self.engine = LLMEngine(
            loaded,
            cache,
            config.scheduler_config(max_len),
            enable_prefix_caching=config.enable_prefix_caching,
            pack_weights=config.pack_weights,
            attention_backend=config.attention_backend,
            seed=config.seed,
            batch_invariant=config.batch_invariant,
            guided_decoding_backend=config.guided_decoding_backend,
            speculative_config=SpeculativeConfig.from_value(config.speculative_config),
        )
        self.tokenizer: Tokenizer | None = loaded.tokenizer  # None: skip_tokenizer_init
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        """The engine's tokenizer; a ValueError when it runs without one (skip_tokenizer_init),
        as vLLM's."""
        return self.engine.require_tokenizer(
            "get_tokenizer() was called,",
            "load the model without skip_tokenizer_init to have one",
        )

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts.

        prompts: a string, a list of token ids, a dict with "prompt" or "prompt_token_ids", or
        a list of those. sampling_params: one SamplingParams for all, or one per prompt."""
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)) and all(
            isinstance(p, SamplingParams) for p in sampling_params
        ):
            params = list(sampling_params)
        else:
            raise ValueError(_bad_sampling_params(sampling_params))
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
        """Apply the chat template to one conversation (or a list of them) and generate.

        Each message is a dict with a `role` (system, developer, user, assistant, tool) and a
        `content` (a string, or a list of {"type": "text", "text": ...} parts); a bad one is a
        ValueError naming it before anything is rendered."""
        tokenizer = self.engine.require_tokenizer(
            "chat renders messages as text through the chat template,",
            "apply the template elsewhere and pass token ids to generate()",
        )
        batch = isinstance(messages, (list, tuple)) and bool(messages)
        batch = batch and all(isinstance(conv, (list, tuple)) for conv in messages)
        convs = list(messages) if batch else [messages]
        for k, conv in enumerate(convs):
            validate_messages(conv, f"messages[{k}]" if batch else "messages")
        prompts = [
            {
                "prompt_token_ids": tokenizer.apply_chat_template(
                    cast(list[dict[str, Any]], conv),
                    add_generation_prompt=add_generation_prompt,
                    tokenize=True,
                    chat_template=chat_template,
                )
            }
            for conv in convs
        ]
        return self.generate(prompts, sampling_params, use_tqdm)  # type: ignore[arg-type]

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams | None = None,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search (transformers' `num_beams` semantics) for each prompt; each output lists
        its finished beams best first. All prompts are searched at once, each a request in the
        engine's continuous batch."""
        params = params or BeamSearchParams()
        order: list[str] = []
        try:
            for prompt in _prompt_list(prompts):
                rid = str(next(self._ids))
                self.engine.add_beam_request(rid, _prompt_input(prompt), params)
                order.append(rid)
            outs = self._run(order, use_tqdm)
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        return [
            BeamSearchOutput(
                out.prompt_token_ids,
                [
                    BeamSearchSequence(
                        c.token_ids,
                        c.cumulative_logprob or 0.0,
                        (c.cumulative_logprob or 0.0) / len(c.token_ids) ** params.length_penalty,
                        c.text,
                        c.finish_reason or "length",
                    )
                    for c in out.outputs
                ],
            )
            for out in outs
        ]

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


_PROMPT_KINDS = (
    "a string, a list of token ids, a dict with 'prompt' (text) or 'prompt_token_ids', or a "
    "list of those"
)


def _bad_sampling_params(value: Any) -> str:
    """The error for sampling_params that are not SamplingParams (or a list of them)."""
    if isinstance(value, Mapping):
        fields = ", ".join(f"{k}={v!r}" for k, v in value.items()) or "max_tokens=16"
        return (
            f"sampling_params must be a SamplingParams or a list of them, not a dict: "
            f"use SamplingParams({fields})"
        )
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(p).__name__ for p in value if not isinstance(p, SamplingParams)})
        return f"sampling_params must be SamplingParams, one per prompt; got {', '.join(kinds)}"
    return f"sampling_params must be a SamplingParams or a list of them, not {type(value).__name__}"


def _prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (text, token ids or a dict) or a sequence of them, as a list."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        return [prompts]  # type: ignore[list-item]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise ValueError(f"prompts must be {_PROMPT_KINDS}; got {type(prompts).__name__}")


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
