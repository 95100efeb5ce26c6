"""LLMEngine: add requests, step the batch, collect outputs. Every front end drives this loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lamina.config import CacheConfig, SchedulerConfig
from lamina.engine.model_runner import ModelRunner
from lamina.engine.sampler import Sampler
from lamina.engine.scheduler import ScheduledBatch, Scheduler
from lamina.engine.sequence import Sequence
from lamina.kv.block_manager import BlockManager
from lamina.kv.cache import KVCache, num_blocks_for
from lamina.loading.detokenizer import IncrementalDetokenizer
from lamina.loading.loader import LoadedModel
from lamina.outputs import CompletionOutput, RequestOutput
from lamina.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class EngineStats:
    """Cumulative counters (per-step gauges are read off the scheduler)."""

    num_steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    forward_seconds: float = 0.0
    step_seconds: float = 0.0


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        self.loaded = loaded
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.cache_config = cache_config or CacheConfig()
        sched = scheduler_config or SchedulerConfig(
            max_model_len=loaded.config.max_position_embeddings
        )
        self.scheduler_config = sched
        num_blocks = num_blocks_for(loaded.config, self.cache_config, loaded.model.dtype)
        self.block_manager = BlockManager(num_blocks, self.cache_config.block_size)
        if self.block_manager.blocks_needed(sched.max_model_len) > num_blocks:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {self.cache_config.block_size} tokens) "
                f"cannot hold one sequence of max_model_len={sched.max_model_len} tokens; "
                "raise the cache budget or lower max_model_len"
            )
        self.cache = KVCache(
            loaded.config, num_blocks, self.cache_config.block_size, loaded.model.dtype
        )
        self.scheduler = Scheduler(sched, self.block_manager)
        self.runner = ModelRunner(loaded.model, self.cache)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set(self.model_config.eos_token_ids)
        gen_eos = self.loaded.generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(gen_eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        ids.update(self.tokenizer.stop_token_ids)  # e.g. GGUF end-of-turn tokens
        return ids

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        """Queue a prompt (text or token ids). Raises ValueError for input that cannot run."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self.validate_prompt(ids)
        seq = Sequence(request_id, ids, params)
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        self.requests[request_id] = Request(request_id, text, ids, params, [seq], [detok])
        self.scheduler.add(seq)

    def validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty; give at least one token of text")
        limit = self.scheduler_config.max_model_len
        if len(ids) >= limit:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context holds max_model_len={limit} "
                "(including at least one generated token); shorten the prompt"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks (unknown ids are ignored)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish("abort")
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [len, vocab] at every prompt position, computed through the paged
        cache like any prefill (blocks are taken and returned at once)."""
        self.validate_prompt(token_ids)
        seq = Sequence("__prompt_logits__", list(token_ids), SamplingParams(max_tokens=1))
        if not self.block_manager.can_grow(seq.block_table, seq.num_tokens):
            raise RuntimeError("not enough free KV blocks to score this prompt now")
        self.block_manager.grow(seq.block_table, seq.num_tokens)
        try:
            logits, _ = self.runner.run(ScheduledBatch([seq], [seq.num_tokens]), all_logits=True)
        finally:
            self.block_manager.release(seq.block_table)
        return logits

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass for every scheduled sequence; returns outputs of requests that
        advanced (finished ones are then forgotten)."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("no request fits in the KV cache; raise its size")
            return []
        t1 = time.perf_counter()
        logits, sampling = self.runner.run(batch)
        self.stats.forward_seconds += time.perf_counter() - t1
        touched = self._advance(batch, logits, sampling)
        self.stats.num_steps += 1
        self.stats.step_seconds += time.perf_counter() - t0
        return [self._output(r) for r in touched]

    def _advance(
        self, batch: ScheduledBatch, logits: torch.Tensor, sampling: list[int]
    ) -> list[Request]:
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            prompt_part = max(
                0, min(seq.num_computed_tokens + n, seq.num_prompt_tokens) - seq.num_computed_tokens
            )
            self.stats.prompt_tokens += prompt_part
            seq.num_computed_tokens += n
        tokens = self.sampler(logits, [batch.seqs[i] for i in sampling]) if sampling else []
        touched: dict[str, Request] = {}
        for i, token in zip(sampling, tokens):
            seq = batch.seqs[i]
            req = self.requests[seq.request_id]
            seq.append_token(token)
            self.stats.generation_tokens += 1
            self._check_stop(seq, req, token)
            if seq.is_finished:
                self.scheduler.finish(seq)
            touched[req.request_id] = req
        for rid, req in touched.items():
            if req.finished:
                del self.requests[rid]
        return list(touched.values())

    def _check_stop(self, seq: Sequence, req: Request, token: int) -> None:
        params = seq.sampling_params
        detok = req.detokenizers[req.seqs.index(seq)]
        new_text = detok.add(token)
        if token in params.stop_token_ids:
            seq.finish("stop", token)
        elif token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("stop", None)
        if seq.is_finished:  # the stop token's own text is not part of the output
            return
        before = len(seq.text)
        seq.text += new_text
        for stop in params.stop_strings:
            at = seq.text.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                seq.text = seq.text[:at]
                seq.finish("stop", stop)
                return
        if params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens:
            seq.finish("length")
        elif seq.num_tokens >= self.scheduler_config.max_model_len:
            seq.finish("length")
        if seq.is_finished:
            # A character cut off by the token limit is dropped, not shown as U+FFFD.
            seq.text += detok.flush().rstrip("\ufffd")

    def _output(self, req: Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=i,
                text=s.text,
                token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(req.seqs)
        ]
        return RequestOutput(
            req.request_id, req.prompt, req.prompt_token_ids, outs, finished=req.finished
        )
