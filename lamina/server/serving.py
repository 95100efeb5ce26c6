"""What both generation endpoints share: settings, prompt and parameter checks that turn bad
input into 400s before it reaches the engine, logprob shapes, and per-choice stream cursors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lamina.guided.spec import GuidedDecoding
from lamina.loading.tokenizer import Tokenizer
from lamina.outputs import CompletionOutput, Logprob, RequestOutput
from lamina.sampling_params import SamplingParams
from lamina.server.async_engine import (
    AsyncEngine,
    EngineClosedError,
    EngineOverloadedError,
    RequestStream,
)
from lamina.server.errors import APIError, from_value_error
from lamina.server.metrics import ServerMetrics
from lamina.server.protocol import (
    CompletionLogprobs,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from lamina.server.settings import ServerSettings
from lamina.streaming import stop_holdback

_SEED_LIMIT = 1 << 63


class Serving:
    """The engine, tokenizer and settings the route handlers work with."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        # None: the server runs without a tokenizer (--skip-tokenizer-init), on token ids
        self._tokenizer: Tokenizer | None = engine.engine.tokenizer
        self.max_model_len = engine.engine.scheduler_config.max_model_len
        self.vocab_size = engine.engine.model_config.vocab_size
        limit = settings.max_prompt_tokens
        self.max_prompt_tokens = min(limit or self.max_model_len, self.max_model_len - 1)
        # no tokenizer's tokens are longer than this: a longer text could never fit
        self.max_prompt_chars = self.max_prompt_tokens * settings.max_chars_per_token

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer; without one (--skip-tokenizer-init) every route that needs it
        (text prompts, chat, /tokenize, /detokenize, /tokenizer_info) answers this 400."""
        return self.require_tokenizer("this route turns text into token ids or back")

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def require_tokenizer(self, what: str, param: str | None = None) -> Tokenizer:
        """The tokenizer, or a 400 saying that `what` needs one and what is accepted."""
        if self._tokenizer is None:
            raise APIError(
                f"{what}, but this server runs without a tokenizer (--skip-tokenizer-init); "
                "it accepts token-id prompts on /v1/completions only",
                400,
                param=param,
            )
        return self._tokenizer

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                400,
                param="model",
                code="model_not_found",
            )

    @staticmethod
    def truncate(ids: list[int], keep: int | None) -> list[int]:
        """The last `keep` prompt ids (vLLM's truncate_prompt_tokens), before any length check,
        so usage, echo and the context check all see the prompt the model sees."""
        if keep is None:
            return ids
        if keep < 1:
            raise APIError(
                f"truncate_prompt_tokens={keep} is invalid; it must be >= 1",
                400,
                param="truncate_prompt_tokens",
            )
        return ids[-keep:]

    def check_prompt_chars(self, num_chars: int, param: str = "prompt") -> None:
        """Refuse, before tokenizing it, a text that cannot fit in max_prompt_tokens whatever
        it tokenizes to: tokenizing megabytes costs seconds of CPU."""
        if num_chars > self.max_prompt_chars:
            raise APIError(
                f"The prompt has {num_chars} characters; this server accepts at most "
                f"{self.max_prompt_chars} ({self.max_prompt_tokens} tokens x "
                f"{self.settings.max_chars_per_token} characters per token).",
                400,
                param=param,
                code="context_length_exceeded",
            )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt, its length checked first. Called off the event loop; the
        batch call releases the GIL while it tokenizes, so the loop keeps answering."""
        tokenizer = self.require_tokenizer("the prompt is text; give token ids", "prompt")
        self.check_prompt_chars(len(text))
        return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def decode_token(self, token_id: int) -> str:
        """A token's text for logprobs; without a tokenizer vLLM's `token_id:N` spelling."""
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def decode_prompt(self, ids: list[int]) -> str:
        """A token-id prompt's text (for echo); "" without a tokenizer, as the outputs' text."""
        if self._tokenizer is None:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def resolve_max_tokens(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        """Check the prompt and prompt + max_tokens against the context; None means all the
        room that is left (OpenAI chat's default)."""
        limit = self.max_model_len
        if n_prompt > self.max_prompt_tokens:
            raise APIError(
                f"The prompt has {n_prompt} tokens; this server accepts at most "
                f"{self.max_prompt_tokens} (context: {limit} tokens).",
                400,
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                400,
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def sampling_params(
        self,
        req: SamplingFields,
        *,
        best_of: int | None,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        guided: GuidedDecoding | None = None,
    ) -> SamplingParams:
        """The request's fields as SamplingParams; its range errors become 400s. `guided`:
        the request's constraint, already compiled (server/structured.py)."""
        self.check_request_caps(req)
        if not self.has_tokenizer:
            for name, value, instead in (
                ("stop", req.stop, "use stop_token_ids"),
                ("bad_words", req.bad_words, "use logit_bias or allowed_token_ids"),
            ):
                if value:
                    self.require_tokenizer(
                        f"{name}={value!r} needs the output text ({instead})", name
                    )
        limit = self.settings.max_n
        for name, v in (("n", req.n), ("best_of", best_of)):
            if v is not None and v > limit:
                raise APIError(
                    f"{name}={v} is invalid; this server allows at most {limit}", 400, param=name
                )
        if req.seed is not None and not -_SEED_LIMIT <= req.seed < _SEED_LIMIT - limit:
            raise APIError(f"seed={req.seed} is invalid; it must fit in 64 bits", param="seed")
        bias = None
        if req.logit_bias:
            try:
                bias = {int(k): v for k, v in req.logit_bias.items()}
            except ValueError:
                raise APIError("logit_bias keys must be token ids", param="logit_bias") from None
        for name, ids in (("logit_bias", bias or {}), ("stop_token_ids", req.stop_token_ids or [])):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(
                    f"{name} has token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})",
                    param=name,
                )
        kwargs: dict[str, Any] = {
            "n": req.n,
            "best_of": best_of,
            "max_tokens": max_tokens,
            "stop": req.stop,
            "seed": req.seed,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "min_tokens": req.min_tokens,
            "stop_token_ids": req.stop_token_ids,
            "ignore_eos": req.ignore_eos,
            "skip_special_tokens": req.skip_special_tokens,
            "logit_bias": bias,
            "include_stop_str_in_output": req.include_stop_str_in_output,
            "bad_words": req.bad_words,
            "allowed_token_ids": req.allowed_token_ids,
            "truncate_prompt_tokens": req.truncate_prompt_tokens,
            "guided": guided,
        }
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            if getattr(req, name) is not None:
                kwargs[name] = getattr(req, name)
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise from_value_error(e) from None

    def check_request_caps(self, req: SamplingFields) -> None:
        """The per-step work a request may ask for: stop strings and bad words (count and
        total length), logit_bias and stop_token_ids entries."""
        s = self.settings
        for name, words in (("stop", req.stop), ("bad_words", req.bad_words)):
            items = [words] if isinstance(words, str) else list(words or [])
            if len(items) > s.max_stop_strings:
                raise APIError(
                    f"{name} has {len(items)} entries; this server allows at most "
                    f"{s.max_stop_strings}",
                    400,
                    param=name,
                )
            chars = sum(len(w) for w in items)
            if chars > s.max_stop_chars:
                raise APIError(
                    f"{name} has {chars} characters in all; this server allows at most "
                    f"{s.max_stop_chars}",
                    400,
                    param=name,
                )
        for name, entries in (
            ("logit_bias", req.logit_bias),
            ("stop_token_ids", req.stop_token_ids),
        ):
            if entries is not None and len(entries) > s.max_logit_bias:
                raise APIError(
                    f"{name} has {len(entries)} entries; this server allows at most "
                    f"{s.max_logit_bias}",
                    400,
                    param=name,
                )

    def check_choices(self, params: list[SamplingParams]) -> None:
        """prompts x max(n, best_of): the sequences one request makes the engine run."""
        limit = self.settings.max_choices_per_request
        total = sum(max(p.n, p.best_of or p.n) for p in params)
        if total > limit:
            raise APIError(
                f"{len(params)} prompts x n (or best_of) asks for {total} sequences in one "
                f"request; this server allows at most {limit}",
                400,
                param="n",
            )

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> RequestStream:
        self.check_choices(params)
        try:
            stream = await self.engine.submit(prompts, params, self.settings.request_timeout)
        except ValueError as e:
            raise from_value_error(e, "prompt") from None
        except EngineClosedError as e:
            raise APIError(str(e), 503) from None
        except EngineOverloadedError as e:
            raise APIError(f"the server is busy: {e}; retry later", 503) from None
        # past the deadline: a 504, or the error event that ends a stream; the handler closes
        # the stream, which aborts its requests and frees their blocks
        stream.timeout_error = _timeout_error
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        return stream

    # ---- logprob shapes -------------------------------------------------------------------
    def completion_logprobs(
        self,
        token_ids: Iterable[int],
        entries: Iterable[dict[int, Logprob] | None],
        offset: int,
        into: CompletionLogprobs | None = None,
    ) -> tuple[CompletionLogprobs, int]:
        """Legacy completions logprobs (tokens, token_logprobs, top_logprobs, text_offset).
        The token's own value is the engine's number, untouched: lm-eval tests greediness with
        `token_logprob == max(top_logprobs.values())`, and both come from one tensor."""
        lp = into or CompletionLogprobs()
        for tid, entry in zip(token_ids, entries):
            top: dict[str, float] | None
            if entry is None:  # the first prompt token has no context
                token, value, top = self.decode_token(tid), None, None
            else:
                own = entry[tid]
                token = own.decoded_token or self.decode_token(tid)
                value = own.logprob
                top = {}
                for t, e in entry.items():
                    key = e.decoded_token or self.decode_token(t)
                    top[key] = max(top.get(key, float("-inf")), e.logprob)
            lp.tokens.append(token)
            lp.token_logprobs.append(value)
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(token)
        return lp, offset

    def chat_logprobs(
        self, token_ids: Iterable[int], entries: Iterable[dict[int, Logprob]], top_n: int
    ) -> list[TokenLogprob]:
        out = []
        for tid, entry in zip(token_ids, entries):
            own = entry[tid]
            ranked = sorted(
                (lp.rank, -lp.logprob, t, lp)
                for t, lp in entry.items()
                if lp.rank is not None and lp.rank <= top_n
            )[:top_n]
            tops = [self._top(t, lp) for _, _, t, lp in ranked]
            out.append(TokenLogprob(**self._top(tid, own).model_dump(), top_logprobs=tops))
        return out

    def _top(self, tid: int, lp: Logprob) -> TopLogprob:
        token = lp.decoded_token if lp.decoded_token is not None else self.decode_token(tid)
        return TopLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode("utf-8")))


def _timeout_error(message: str) -> APIError:
    return APIError(message, 504, type="timeout_error", code="request_timeout")


@dataclass
class ChoiceCursor:
    """How much of one choice has been streamed. Text that might still turn into a stop string
    is held back (a stop string is cut out of the output, so its prefix must never be sent)."""

    text_sent: int = 0
    tokens_sent: int = 0
    started: bool = False
    finished: bool = False

    def advance(self, out: CompletionOutput, stops: list[str]) -> tuple[str, int, int] | None:
        """(new text, first new token, end token) to send now, or None if nothing is due."""
        done = out.finish_reason is not None
        text = out.text
        end = len(text) if done else len(text) - stop_holdback(text, stops)
        if end <= self.text_sent and not done:
            return None
        delta = text[self.text_sent : end] if end > self.text_sent else ""
        t0, t1 = self.tokens_sent, len(out.token_ids)
        self.text_sent = max(end, self.text_sent)
        self.tokens_sent = t1
        self.finished = done
        return delta, t0, t1


def usage(prompt_tokens: int, outputs: Iterable[CompletionOutput]) -> Usage:
    completion = sum(len(o.token_ids) for o in outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def final_outputs(out: RequestOutput | None, n: int) -> list[CompletionOutput]:
    """The n choices of a request; any the server aborted (shutdown) end with "abort"."""
    outs = list(out.outputs) if out is not None else []
    outs += [CompletionOutput(i, "", []) for i in range(len(outs), n)]
    for o in outs:
        if o.finish_reason is None:
            o.finish_reason = "abort"
    return outs[:n]


async def collect(stream: RequestStream) -> dict[int, RequestOutput | None]:
    """Wait for every request of the stream; the last output of each (None if aborted
    before producing any)."""
    last: dict[int, RequestOutput | None] = dict.fromkeys(range(len(stream.ids)))
    async for i, out in stream:
        if out is not None:
            last[i] = out  # noqa: PERF403 - an async stream, consumed as it arrives
    return last


def sse(obj: BaseModel | dict[str, Any]) -> str:
    """One server-sent event; fields left unset (role, usage, ...) are omitted, as vLLM does."""
    if isinstance(obj, BaseModel):
        data = obj.model_dump_json(exclude_unset=True)
    else:
        data = json.dumps(obj)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that always closes its engine requests when it ends, however it ends:
    finished, client disconnected (Starlette cancels the body), or server shutdown. Closing in
    the response rather than in the body generator also covers a disconnect that happens
    before the generator first runs."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
