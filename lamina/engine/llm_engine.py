"""LLMEngine: add requests, step the batch, collect outputs. Every front end drives this loop."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from lamina.config import CacheConfig, SchedulerConfig
from lamina.engine.model_runner import ModelRunner
from lamina.engine.request import Request
from lamina.engine.sampler import Sampler, SampleResult
from lamina.engine.scheduler import ScheduledBatch, Scheduler
from lamina.engine.sequence import Sequence, make_generator
from lamina.engine.stats import EngineStats
from lamina.kv.block_manager import BlockManager
from lamina.kv.cache import KVCache, num_blocks_for
from lamina.kv.h2o import H2OPolicy, H2OState
from lamina.kv.policies import StreamingPolicy
from lamina.loading.loader import LoadedModel
from lamina.outputs import RequestOutput
from lamina.sampling_params import SamplingParams


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        enable_prefix_caching: bool = True,
        pack_weights: bool = True,
    ) -> None:
        self.loaded = loaded
        if pack_weights:  # the engine owns the model from here: pack its GEMMs for this CPU
            loaded.model.pack_weights()
        elif loaded.model.embed_tokens.numel() > 0:  # the dense table stays: a compact
            loaded.model.embed_lookup = None  # lookup table would only take memory
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.cache_config = cache_config or CacheConfig()
        sched = scheduler_config or SchedulerConfig(
            max_model_len=loaded.config.max_position_embeddings
        )
        self.scheduler_config = sched
        num_blocks = num_blocks_for(loaded.config, self.cache_config, loaded.model.dtype)
        cc = self.cache_config
        self.policy: StreamingPolicy | H2OPolicy | None = None
        if cc.sliding_window is not None:
            self.policy = StreamingPolicy(cc.attention_sinks, cc.sliding_window, cc.block_size)
        elif cc.h2o_heavy is not None and cc.h2o_recent is not None:
            self.policy = H2OPolicy(
                cc.h2o_heavy, cc.h2o_recent, cc.block_size, cc.h2o_cache_positions
            )
            enable_prefix_caching = False  # blocks with holes are no reusable prefix
        self.block_manager = BlockManager(num_blocks, cc.block_size, enable_prefix_caching)
        per_request = self.block_manager.blocks_needed(sched.max_model_len)
        if self.policy is not None:  # memory per request is bounded by the policy
            per_request = min(per_request, self.policy.blocks_needed(sched.max_num_batched_tokens))
        if per_request > num_blocks:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {self.cache_config.block_size} tokens) "
                f"cannot hold one sequence of max_model_len={sched.max_model_len} tokens; "
                "raise the cache budget or lower max_model_len"
            )
        self.cache = KVCache(
            loaded.config,
            num_blocks,
            self.cache_config.block_size,
            loaded.model.dtype,
            kv_cache_dtype=self.cache_config.kv_cache_dtype,
        )
        self.scheduler = Scheduler(sched, self.block_manager, self.policy)
        self.runner = ModelRunner(loaded.model, self.cache, self.policy)
        self.eos_token_ids = self._eos_ids()
        self.sampler = Sampler(self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set(self.model_config.eos_token_ids)
        gen_eos = self.loaded.generation_config.get("eos_token_id")
        ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
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
        vocab = self.model_config.vocab_size
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        bad += [t for t in params.stop_token_ids or [] if t >= vocab]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} in logit_bias / stop_token_ids are outside "
                f"the vocabulary [0, {vocab})"
            )
        if isinstance(self.policy, H2OPolicy) and (params.best_of or 1) > 1:
            raise ValueError("n / best_of > 1 cannot share blocks under H2O eviction; use n=1")
        req = Request(request_id, text, ids, params, self.tokenizer)
        self.start_sequence(req.seqs[0])
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])

    def start_sequence(self, seq: Sequence) -> None:
        """Per-sequence state fixed at admission: what a retention policy needs, and the
        dynamic-NTK length."""
        if isinstance(self.policy, H2OPolicy):
            seq.h2o = H2OState()
        seq.rope_len = self._rope_len(seq)

    def _rope_len(self, seq: Sequence) -> int | None:
        """Dynamic NTK's per-sequence length (lamina/layers/rotary.py): the most tokens the
        model will be fed for this request (the last generated one never is), capped by the
        context, or by the kept span under StreamingLLM / H2O with cache positions. None
        when that fits the trained context (the trained base)."""
        if self.model_config.rope.rope_type != "dynamic":
            return None
        limit = self.scheduler_config.max_model_len
        max_tokens = seq.sampling_params.max_tokens
        length = min(limit, seq.num_prompt_tokens + (max_tokens or limit) - 1)
        if isinstance(self.policy, StreamingPolicy):
            length = min(length, self.policy.sinks + self.policy.window)
        elif isinstance(self.policy, H2OPolicy) and self.policy.cache_positions:
            length = min(length, self.policy.budget)
        return length if length > self.model_config.max_position_embeddings else None

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

    def abort(self, request_id: str | Iterable[str]) -> None:
        """Stop requests now and free their blocks (unknown ids are ignored)."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.pop(rid, None)
            for seq in req.seqs if req else []:
                if not seq.is_finished:
                    seq.finish("abort")
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def prompt_logits(self, token_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Float32 logits [len, vocab] at every prompt position, computed through the paged
        cache like any prefill (blocks are taken and returned at once). With `chunk_size`, the
        prompt is fed in chunks, each attending to the cache the earlier ones left: what a
        quantized or windowed (StreamingLLM) cache actually gives."""
        return torch.cat(
            [
                self.runner.logits(hidden, list(range(hidden.shape[0])))
                for _, hidden in self.prompt_chunks(token_ids, chunk_size)
            ]
        )

    def prompt_chunks(
        self, token_ids: list[int], chunk_size: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Feed a prompt through the paged cache alone, `chunk_size` tokens per forward (all
        at once by default), with the retention policy evicting between chunks; yields each
        chunk's first position and hidden states [n, hidden]. Its blocks are returned when the
        iteration ends (or is abandoned)."""
        self.validate_prompt(token_ids)
        seq = Sequence("__prompt__", list(token_ids), SamplingParams(max_tokens=1))
        self.start_sequence(seq)
        step = chunk_size or seq.num_tokens
        bm = self.block_manager
        try:
            while seq.num_computed_tokens < seq.num_tokens:
                start = seq.num_computed_tokens
                n = min(step, seq.num_tokens - start)
                self.scheduler.evict_for_step(seq)
                target = self.scheduler.blocks_target(seq, n)
                if not bm.can_grow(seq.block_table, target):
                    raise RuntimeError(
                        f"not enough free KV blocks to score this prompt now (at token {start}: "
                        f"the table needs {target} tokens, {bm.num_free_blocks} blocks free)"
                    )
                bm.grow(seq.block_table, target)
                hidden, _ = self.runner.forward(ScheduledBatch([seq], [n]))
                seq.num_computed_tokens += n
                self._evict_heavy_hitters(seq)
                yield start, hidden
        finally:
            bm.release(seq.block_table)

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass for every scheduled sequence; returns the outputs of requests that
        advanced (finished ones are then forgotten)."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("no request fits in the KV cache; raise its size")
            return []
        t1 = time.perf_counter()
        hidden, starts = self.runner.forward(batch)
        sample_rows, lp_rows = self._rows(batch, starts)
        logits = self.runner.logits(hidden, sample_rows + [r for _, r, _ in lp_rows])
        t2 = time.perf_counter()
        self._record_prompt_logprobs(lp_rows, logits[len(sample_rows) :])
        sampling = self._advance_computed(batch)
        touched = self._sample(sampling, logits[: len(sample_rows)])
        outputs = []
        for rid in touched:
            req = self.requests[rid]
            outputs.append(req.output())
            if req.finished:
                del self.requests[rid]
        t3 = time.perf_counter()
        self.stats.record_step(self, batch, t3 - t0, t2 - t1)
        return outputs

    def _rows(
        self, batch: ScheduledBatch, starts: list[int]
    ) -> tuple[list[int], list[tuple[Sequence, int, int]]]:
        """Hidden rows whose logits are needed: one per sequence that samples this step, and
        (seq, row, target token) for prompt log-probabilities."""
        sample_rows: list[int] = []
        lp_rows: list[tuple[Sequence, int, int]] = []
        for seq, n, start in zip(batch.seqs, batch.num_new_tokens, starts):
            first = seq.num_computed_tokens
            if first + n == seq.num_tokens:
                sample_rows.append(start + n - 1)
            req = self.requests[seq.request_id]
            if req.prompt_logprobs is not None and seq.index == 0 and not seq.output_token_ids:
                for p in range(first, min(first + n, seq.num_prompt_tokens - 1)):
                    lp_rows.append((seq, start + p - first, seq.prompt_token_ids[p + 1]))
        return sample_rows, lp_rows

    def _record_prompt_logprobs(
        self, lp_rows: list[tuple[Sequence, int, int]], logits: torch.Tensor
    ) -> None:
        if not lp_rows:
            return
        logprobs = logits.log_softmax(dim=-1)
        targets = torch.tensor([t for _, _, t in lp_rows])
        chosen = logprobs.gather(1, targets.unsqueeze(1))
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        for i, (seq, _, target) in enumerate(lp_rows):
            req = self.requests[seq.request_id]
            k = req.params.prompt_logprobs or 0
            top_v, top_i = logprobs[i].topk(k) if k else (torch.empty(0), torch.empty(0))
            assert req.prompt_logprobs is not None
            req.prompt_logprobs.append(
                req.logprob_entry(
                    target, float(chosen[i]), ranks[i], list(zip(top_i.tolist(), top_v.tolist()))
                )
            )

    def _advance_computed(self, batch: ScheduledBatch) -> list[Sequence]:
        """Mark the fed tokens computed, index newly full blocks, and return the sequences
        that now sample (every token of theirs is computed)."""
        sampling = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            before = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.stats.prompt_tokens_computed += max(
                0, min(seq.num_computed_tokens, seq.num_prompt_tokens) - before
            )
            self.block_manager.register_full_blocks(
                seq.block_table,
                seq.block_hashes,
                seq.token_ids,
                seq.num_computed_tokens,
                self.policy.sink_blocks if isinstance(self.policy, StreamingPolicy) else 0,
                seq.num_evicted_blocks,
                seq.rope_len,
            )
            self._evict_heavy_hitters(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampling.append(seq)
        return sampling

    def _evict_heavy_hitters(self, seq: Sequence) -> None:
        if isinstance(self.policy, H2OPolicy) and seq.h2o is not None:
            self.policy.evict(seq.h2o)

    def _sample(self, sampling: list[Sequence], logits: torch.Tensor) -> set[str]:
        rows: list[int] = []
        seqs: list[Sequence] = []
        for i, seq in enumerate(sampling):
            req = self.requests[seq.request_id]
            family = [seq]
            if not req.forked:  # prompt done: split off the other best_of - 1 samples
                req.forked = True
                for idx in range(1, req.params.best_of or 1):
                    child = seq.fork(idx, self.block_manager.fork(seq.block_table))
                    child.generator = make_generator(req.params.seed, idx)
                    req.add_seq(child)
                    self.scheduler.add_running(child)
                    family.append(child)
            rows += [i] * len(family)
            seqs += family
        results = self.sampler(logits[torch.tensor(rows)], seqs) if seqs else []
        now = time.monotonic()
        touched: set[str] = set()
        for seq, res in zip(seqs, results):
            req = self.requests[seq.request_id]
            if req.first_token_time is None:
                req.first_token_time = now
            if seq.request_id not in touched:
                req.token_times.append(now)
            self._append(seq, req, res)
            touched.add(seq.request_id)
        return touched

    def _append(self, seq: Sequence, req: Request, res: SampleResult) -> None:
        seq.append_token(res.token)
        seq.cumulative_logprob += res.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(req.logprob_entry(res.token, res.logprob, res.rank, res.top))
        self.stats.generation_tokens += 1
        self._check_stop(seq, req, res.token)
        if seq.is_finished:
            self.scheduler.finish(seq)

    def _check_stop(self, seq: Sequence, req: Request, token: int) -> None:
        params = seq.sampling_params
        detok = req.detokenizers[seq.seq_id]
        new_text = detok.add(token)
        # (the sampler never picks EOS / stop ids before min_tokens)
        if token in params.stop_token_ids:
            seq.finish("stop", token)
        elif token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("stop", None)
        if seq.is_finished:  # the stop token's own text is not part of the output
            return
        before = len(seq.text)
        seq.text += new_text
        if len(seq.output_token_ids) >= params.min_tokens:
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
