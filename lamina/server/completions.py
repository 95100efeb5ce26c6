"""POST /v1/completions: prompts as text, token ids, or batches of either; echo; legacy logprobs
(lm-eval's loglikelihood path: echo + logprobs + max_tokens 1 on token-id prompts); n / best_of;
stop strings; seeds; SSE streaming with an optional final usage chunk."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lamina.outputs import CompletionOutput, RequestOutput
from lamina.sampling_params import SamplingParams
from lamina.server.async_engine import RequestStream
from lamina.server.errors import APIError, internal_error
from lamina.server.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from lamina.server.serving import (
    SSE_DONE,
    ChoiceCursor,
    EngineStreamingResponse,
    Serving,
    collect,
    final_outputs,
    sse,
    usage,
)
from lamina.server.structured import structured_request


class _Prompt:
    """One prompt of the request: its ids and (for echo) its text."""

    def __init__(self, sv: Serving, prompt: str | list[int]) -> None:
        self._sv = sv
        if isinstance(prompt, str):
            self._text: str | None = prompt
            self.ids = sv.encode(prompt)
        else:
            self._text, self.ids = None, list(prompt)

    def truncate(self, ids: list[int]) -> None:
        """Keep only `ids` (the prompt's tail): echo then shows what the model saw."""
        if len(ids) != len(self.ids):
            self._text, self.ids = None, ids

    @property
    def text(self) -> str:
        if self._text is None:
            bad = [t for t in self.ids if not 0 <= t < self._sv.vocab_size]
            if bad:  # the engine rejects these too; decoding them first would raise
                raise APIError(
                    f"prompt token ids {bad[:5]} are outside the vocabulary", 400, param="prompt"
                )
            self._text = self._sv.decode_prompt(self.ids)
        return self._text


def _prompts(sv: Serving, prompt: object) -> list[_Prompt]:
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)  # type: ignore[call-overload]
    if not items:
        raise APIError(
            "prompt is empty; give a string, token ids, or a list of them", 400, param="prompt"
        )
    limit = sv.settings.max_prompts_per_request
    if len(items) > limit:
        raise APIError(
            f"{len(items)} prompts in one request; the limit is {limit}", 400, param="prompt"
        )
    return [_Prompt(sv, p) for p in items]


async def create_completion(sv: Serving, req: CompletionRequest, raw: Request) -> Response:
    sv.check_model(req.model)
    if req.suffix:
        raise APIError("suffix is not supported", 400, param="suffix")
    if req.stream and req.best_of is not None and req.best_of != req.n:
        raise APIError("best_of must equal n when streaming", 400, param="best_of")
    # tokenizing a long prompt takes milliseconds: off the event loop, which streams everyone
    prompts = await asyncio.to_thread(_prompts, sv, req.prompt)
    for p in prompts:
        if req.truncate_prompt_tokens is not None:
            p.truncate(sv.truncate(p.ids, req.truncate_prompt_tokens))
    want_prompt_lp = req.echo and req.logprobs is not None
    guided = await structured_request(sv, req)
    params = [
        sv.sampling_params(
            req,
            best_of=req.best_of,
            max_tokens=sv.resolve_max_tokens(len(p.ids), req.max_tokens, "max_tokens"),
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if want_prompt_lp else None,
            guided=guided,
        )
        for p in prompts
    ]
    if req.echo:
        for p in prompts:
            _ = p.text  # decode now: a bad id is a 400, not a failure mid-stream
    stream = await sv.submit([p.ids for p in prompts], params)
    rid = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
        body = _stream(sv, req, prompts, params[0], stream, rid)
        return EngineStreamingResponse(body, on_close=stream.close)
    try:
        stream.watch(raw.is_disconnected)
        last = await collect(stream)
    finally:
        stream.close()
    choices: list[CompletionChoice] = []
    outputs: list[CompletionOutput] = []
    for i, p in enumerate(prompts):
        for o in final_outputs(last[i], req.n):
            outputs.append(o)
            choices.append(_choice(sv, req, p, last[i], o, i * req.n + o.index))
    result = Completion(
        id=rid,
        model=sv.model_name,
        choices=choices,
        usage=usage(sum(len(p.ids) for p in prompts), outputs),
    )
    return JSONResponse(result.model_dump(mode="json"))


def _choice(
    sv: Serving,
    req: CompletionRequest,
    p: _Prompt,
    out: RequestOutput | None,
    o: CompletionOutput,
    index: int,
) -> CompletionChoice:
    lp = None
    if req.logprobs is not None:
        lp = CompletionLogprobs()
        if req.echo and out is not None and out.prompt_logprobs is not None:
            sv.completion_logprobs(p.ids, out.prompt_logprobs, 0, lp)
        sv.completion_logprobs(o.token_ids, o.logprobs or [], len(p.text), lp)
    return CompletionChoice(
        index=index,
        text=(p.text if req.echo else "") + o.text,
        logprobs=lp,
        finish_reason=o.finish_reason,
        stop_reason=o.stop_reason,
    )


async def _stream(
    sv: Serving,
    req: CompletionRequest,
    prompts: list[_Prompt],
    params: SamplingParams,
    stream: RequestStream,
    rid: str,
) -> AsyncIterator[str]:
    created = int(time.time())
    n = req.n
    cursors: dict[int, ChoiceCursor] = {}
    last: dict[int, RequestOutput] = {}
    offsets: dict[int, int] = {}  # text_offset of each choice's next token

    def chunk(choice: CompletionChoice) -> str:
        return sse(Completion(id=rid, created=created, model=sv.model_name, choices=[choice]))

    try:
        async for pi, out in stream:
            p = prompts[pi]
            if out is None:  # aborted by the server (shutdown): end each open choice
                for j in range(n):
                    cur = cursors.setdefault(pi * n + j, ChoiceCursor())
                    if not cur.finished:
                        cur.finished = True
                        yield chunk(
                            CompletionChoice(index=pi * n + j, text="", finish_reason="abort")
                        )
                continue
            last[pi] = out
            for o in out.outputs:
                gi = pi * n + o.index
                cur = cursors.setdefault(gi, ChoiceCursor())
                if cur.finished:
                    continue
                step = cur.advance(o, params.stop_strings)
                if step is None:
                    continue
                delta, t0, t1 = step
                text, lp = delta, None
                if req.logprobs is not None:
                    lp = CompletionLogprobs()
                if req.echo and not cur.started:
                    text = p.text + delta
                    if lp is not None and out.prompt_logprobs is not None:
                        sv.completion_logprobs(p.ids, out.prompt_logprobs, 0, lp)
                cur.started = True
                if lp is not None:
                    _, offsets[gi] = sv.completion_logprobs(
                        o.token_ids[t0:t1],
                        (o.logprobs or [])[t0:t1],
                        offsets.get(gi, len(p.text)),
                        lp,
                    )
                yield chunk(
                    CompletionChoice(
                        index=gi,
                        text=text,
                        logprobs=lp,
                        finish_reason=o.finish_reason,
                        stop_reason=o.stop_reason,
                    )
                )
        if req.stream_options is not None and req.stream_options.include_usage:
            outs = [o for i, p in enumerate(prompts) for o in final_outputs(last.get(i), n)]
            total = usage(sum(len(p.ids) for p in prompts), outs)
            yield sse(
                Completion(id=rid, created=created, model=sv.model_name, choices=[], usage=total)
            )
    except Exception as e:  # the engine failed mid-stream: say so in the stream
        yield sse(internal_error("a /v1/completions stream", e).body())
    yield SSE_DONE
