"""LLMEngine: add requests, step the batch, collect outputs. Every front end drives this loop.

The engine is a coordinator: the scheduler picks each step's work, the model runner runs it,
the output processor turns logits into tokens, beam steps or scores, and the retention policy
and attention backend (chosen here, at start) are the seams they all call through.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from lamina.attention.registry import select_attention_backend
from lamina.config import CacheConfig, SchedulerConfig
from lamina.engine.batch_invariance import resolve_batch_invariance
from lamina.engine.beam_search import BeamGroup
from lamina.engine.logits_processors import default_processors
from lamina.engine.model_runner import ModelRunner
from lamina.engine.output_processor import OutputProcessor
from lamina.engine.request import Request
from lamina.engine.sampler import Sampler
from lamina.engine.scheduler import Scheduler
from lamina.engine.sequence import Sequence, derive_seed
from lamina.engine.stats import EngineStats
from lamina.guided.backend import TokenizerInfo
from lamina.guided.compiler import GrammarCompiler
from lamina.kv.block_manager import BlockManager
from lamina.kv.cache import KVCache, num_blocks_for
from lamina.kv.registry import retention_policy_for
from lamina.kv.retention import RetentionPolicy
from lamina.loading.loader import LoadedModel
from lamina.loading.tokenizer import Tokenizer
from lamina.outputs import RequestOutput
from lamina.sampling_params import BeamSearchParams, SamplingParams
from lamina.spec.config import SpeculativeConfig
from lamina.spec.speculator import Speculator


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        enable_prefix_caching: bool = True,
        pack_weights: bool = True,
        attention_backend: str = "auto",
        retention_policy: RetentionPolicy | None = None,
        seed: int | None = None,
        batch_invariant: bool | str = "auto",
        guided_decoding_backend: str = "llguidance",
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        """`retention_policy` overrides the one the cache config asks for (a policy of your
        own); `attention_backend` is a registered backend name or "auto". `seed`: requests
        without their own seed get one derived from (seed, their arrival number among the
        requests added with `add_request`), so a rerun samples the same (EngineConfig.seed).
        `batch_invariant`: "auto" / "on" / "off" (or a bool): outputs independent of the
        batch (EngineConfig.batch_invariant; `self.batch_invariant` says whether it is on).
        `guided_decoding_backend`: the registered grammar backend (lamina/guided/registry.py).
        `speculative_config`: guess tokens and verify them in the batch (lamina/spec/)."""
        self.loaded = loaded
        if pack_weights:  # the engine owns the model from here: pack its GEMMs for this CPU
            loaded.model.pack_weights()
        elif loaded.model.embed_tokens.numel() > 0:  # the dense table stays: a compact
            loaded.model.embed_lookup = None  # lookup table would only take memory
        self.model_config = loaded.config
        # None with skip_tokenizer_init: prompts are token ids, outputs carry no text
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.cache_config = cc = cache_config or CacheConfig()
        sched = scheduler_config or SchedulerConfig(
            max_model_len=loaded.config.max_position_embeddings
        )
        self.scheduler_config = sched
        self.policy = retention_policy or retention_policy_for(cc)
        num_blocks = num_blocks_for(loaded.config, cc, loaded.model.dtype)
        prefix_caching = enable_prefix_caching and self.policy.allows_prefix_caching
        self.block_manager = BlockManager(num_blocks, cc.block_size, prefix_caching)
        per_request = self.policy.max_blocks_per_request(
            sched.max_model_len, sched.max_num_batched_tokens
        )
        if per_request > num_blocks:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {cc.block_size} tokens) "
                f"cannot hold one sequence of max_model_len={sched.max_model_len} tokens; "
                "raise the cache budget or lower max_model_len"
            )
        self.cache = KVCache(
            loaded.config,
            num_blocks,
            cc.block_size,
            loaded.model.dtype,
            kv_cache_dtype=cc.kv_cache_dtype,
        )
        self.batch_invariant, attention_backend = resolve_batch_invariance(
            batch_invariant, attention_backend, loaded.model, self.policy.attention_kind
        )
        loaded.model.set_batch_invariant(self.batch_invariant)
        backend = select_attention_backend(
            attention_backend, loaded.model.embed_tokens.device, self.policy.attention_kind
        )
        self.scheduler = Scheduler(sched, self.block_manager, self.policy)
        self.runner = ModelRunner(loaded.model, self.cache, self.policy, backend)
        self.eos_token_ids = self._eos_ids()
        self.requests: dict[str, Request] = {}
        self.grammars = GrammarCompiler(
            guided_decoding_backend, self._grammar_tokenizer, loaded.config.vocab_size
        )
        processors = default_processors(self.eos_token_ids)
        processors.insert(1, self.grammars.processor)  # hard constraints first
        self.output_processor = OutputProcessor(
            self.requests,
            self.scheduler,
            Sampler(self.eos_token_ids, processors),
            self.eos_token_ids,
            sched.max_model_len,
        )
        self.stats = EngineStats()
        self.stats.spec = self.output_processor.spec_stats
        self.speculator = self._speculator(speculative_config)
        self._internal_ids = itertools.count()
        self.seed = seed
        self._num_sample_requests = 0  # sampling requests admitted: the engine seed's counter

    def _speculator(self, config: SpeculativeConfig | None) -> Speculator | None:
        if config is None:
            return None
        if self.policy.name != "dense":
            raise ValueError(
                f"speculative decoding needs the dense KV cache; the {self.policy.name} retention "
                "policy cannot be combined with it (drop speculative_config, or the policy)"
            )
        speculator = Speculator(config, self.scheduler_config.max_model_len, self.loaded.model)
        self.output_processor.keep_hidden = speculator.proposer.needs_hidden
        return speculator

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set(self.model_config.eos_token_ids)
        gen_eos = self.loaded.generation_config.get("eos_token_id")
        ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        if self.tokenizer is None:  # skip_tokenizer_init: the model's own files say it all
            return ids
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        ids.update(self.tokenizer.stop_token_ids)  # e.g. GGUF end-of-turn tokens
        return ids

    def _grammar_tokenizer(self) -> TokenizerInfo:
        tokenizer = self.require_tokenizer(
            "guided decoding constrains text", "constrain token ids with allowed_token_ids"
        )
        return TokenizerInfo(
            tokenizer.backend.to_str(), self.model_config.vocab_size, tuple(self.eos_token_ids)
        )

    def require_tokenizer(self, what: str, accepted: str = "give token ids") -> Tokenizer:
        """The tokenizer, or a ValueError saying that `what` needs one, that this engine runs
        without (skip_tokenizer_init), and what it accepts instead."""
        if self.tokenizer is None:
            raise ValueError(
                f"{what} but the engine runs without a tokenizer (skip_tokenizer_init); {accepted}"
            )
        return self.tokenizer

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        """Queue a prompt (text or token ids). Raises ValueError for input that cannot run."""
        params = params or SamplingParams()
        text, ids = self._prompt_ids(request_id, prompt, params.truncate_prompt_tokens)
        if self.tokenizer is None:
            self._check_token_only(params)
        vocab = self.model_config.vocab_size
        for name, given in (
            ("logit_bias", list(params.logit_bias or {})),
            ("stop_token_ids", params.stop_token_ids or []),
            ("allowed_token_ids", params.allowed_token_ids or []),
        ):
            bad = [t for t in given if t >= vocab]
            if bad:
                raise ValueError(
                    f"{name}={bad[:5]} is invalid: token ids outside the vocabulary [0, {vocab})"
                )
        if not self.policy.allows_forks and (params.best_of or 1) > 1:
            raise ValueError(
                f"n / best_of > 1 cannot share blocks under the {self.policy.name} retention "
                "policy; use n=1"
            )
        seed = params.seed
        if seed is None and self.seed is not None:
            seed = derive_seed(self.seed, self._num_sample_requests)
        req = Request(
            request_id,
            text,
            ids,
            params,
            self.tokenizer,
            seed=seed,
            bad_words_ids=self._bad_words_ids(params.bad_words or []),
            grammar=self.grammars.matcher(guided) if (guided := params.guided_decoding) else None,
        )
        self._admit(req)
        self._num_sample_requests += 1

    def _check_token_only(self, params: SamplingParams) -> None:
        """Without a tokenizer no text is made (vLLM's detokenize=False), so what works on
        text is refused rather than silently ignored."""
        if params.stop_strings:
            self.require_tokenizer(
                f"stop={params.stop_strings!r} are strings, which are matched on the output text,",
                "use stop_token_ids",
            )
        if params.bad_words:
            self.require_tokenizer(
                f"bad_words={params.bad_words!r} must be tokenized,",
                "ban token ids with logit_bias (-100) or allowed_token_ids",
            )

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad words: each word (leading spaces stripped) as is, and
        with a leading space when that gives a different first token and no more tokens (the
        word in the middle of a text)."""
        out: list[list[int]] = []
        if not words:
            return out
        tokenizer = self.require_tokenizer("bad_words must be tokenized,")
        for word in words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            if plain:
                out.append(plain)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
                out.append(spaced)
        return out

    def add_beam_request(
        self, request_id: str, prompt: str | list[int], params: BeamSearchParams
    ) -> None:
        """Queue a beam search; it runs in `step()` beside every other request, and its
        output lists the finished beams, best first."""
        if not self.policy.allows_beam_search:
            raise ValueError(
                f"beam search runs on a dense KV cache; the {self.policy.name} retention "
                "policy does not support it (turn StreamingLLM / H2O off)"
            )
        text, ids = self._prompt_ids(request_id, prompt)
        max_tokens = min(params.max_tokens, self.scheduler_config.max_model_len - len(ids))
        req = Request(request_id, text, ids, SamplingParams(max_tokens=max_tokens), self.tokenizer)
        req.kind = "beam"
        eos = set() if params.ignore_eos else set(self.eos_token_ids)
        req.beam = BeamGroup(params, max_tokens, eos)
        self._admit(req)

    def add_scoring_request(
        self,
        request_id: str,
        token_ids: list[int],
        on_hidden: Callable[[int, torch.Tensor], None],
        chunk_size: int | None = None,
    ) -> None:
        """Queue a prompt to be fed through the cache and not continued: `on_hidden(first,
        hidden)` receives the final hidden states of each chunk of positions computed (at most
        `chunk_size` per step, and the step budget). Every position is computed (none comes
        from the prefix cache); the request finishes once the whole prompt is."""
        text, ids = self._prompt_ids(request_id, token_ids)
        req = Request(request_id, text, ids, SamplingParams(max_tokens=1), self.tokenizer)
        req.kind = "score"
        req.on_hidden = on_hidden
        seq = req.seqs[0]
        seq.max_chunk = chunk_size
        seq.reads_every_position = True
        self._admit(req)

    def _prompt_ids(
        self, request_id: str, prompt: str | list[int], truncate: int | None = None
    ) -> tuple[str | None, list[int]]:
        """The prompt's text (None if given as ids) and token ids, checked; `truncate` keeps
        only the last that many ids (SamplingParams.truncate_prompt_tokens), before the
        check."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text: str | None = prompt
            ids = self.require_tokenizer("prompt is text", "give token ids").encode(prompt)
        else:
            text, ids = None, list(prompt)
        if truncate is not None:
            ids = ids[-truncate:]
        self.validate_prompt(ids)
        return text, ids

    def _admit(self, req: Request) -> None:
        self.start_sequence(req.seqs[0])
        self.requests[req.request_id] = req
        self.scheduler.add(req.seqs[0])

    def start_sequence(self, seq: Sequence) -> None:
        """Per-sequence state fixed at admission: what the retention policy needs, and the
        dynamic-NTK length."""
        self.policy.start(seq)
        seq.rope_len = self._rope_len(seq)

    def _rope_len(self, seq: Sequence) -> int | None:
        """Dynamic NTK's per-sequence length (lamina/layers/rotary.py): the most tokens the
        model will be fed for this request (the last generated one never is), capped by the
        context, or by the positions the retention policy keeps. None when that fits the
        trained context (the trained base)."""
        if self.model_config.rope.rope_type != "dynamic":
            return None
        limit = self.scheduler_config.max_model_len
        max_tokens = seq.sampling_params.max_tokens
        length = min(limit, seq.num_prompt_tokens + (max_tokens or limit) - 1)
        kept = self.policy.max_positions()
        if kept is not None:
            length = min(length, kept)
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
        cache by the engine's own loop, as a scoring request. With `chunk_size`, the prompt is
        fed in chunks, each attending to the cache the earlier ones left: what a quantized or
        windowed (StreamingLLM) cache actually gives."""
        return torch.cat(
            [
                self.runner.logits(hidden, list(range(hidden.shape[0])))
                for _, hidden in self.prompt_chunks(token_ids, chunk_size)
            ]
        )

    def prompt_chunks(
        self, token_ids: list[int], chunk_size: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Feed a prompt through the engine as a scoring request, `chunk_size` tokens per step
        at most (and at most the step budget); yields each chunk's first position and hidden
        states [n, hidden]. The engine must be otherwise idle (their outputs would be lost);
        the request is aborted if the iteration is abandoned."""
        if self.requests:
            raise RuntimeError(
                "prompt scoring drives the engine's loop; finish or abort the "
                f"{len(self.requests)} running request(s) first"
            )
        chunks: list[tuple[int, torch.Tensor]] = []
        rid = f"__score_{next(self._internal_ids)}__"
        self.add_scoring_request(
            rid, list(token_ids), lambda first, h: chunks.append((first, h)), chunk_size
        )
        try:
            while rid in self.requests:
                self.step()
                yield from chunks
                chunks.clear()
        finally:
            self.abort(rid)

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass for every scheduled sequence; returns the outputs of requests that
        advanced (finished ones are then forgotten)."""
        t0 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(
                [s for s in self.scheduler.running if self.requests[s.request_id].kind == "sample"]
            )
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("no request fits in the KV cache; raise its size")
            return []
        t1 = time.perf_counter()
        scheduled_at = time.monotonic()
        hidden, starts = self.runner.forward(batch)
        plan = self.output_processor.plan(batch, starts, scheduled_at)
        logits = self.runner.logits(hidden, plan.rows)
        t2 = time.perf_counter()
        self.scheduler.advance(batch)
        outputs = self.output_processor.process(plan, logits, hidden)
        t3 = time.perf_counter()
        self.stats.record_step(
            self.scheduler, self.output_processor.generation_tokens, batch, t3 - t0, t2 - t1
        )
        return outputs
