"""POST /v1/chat/completions: the model's chat template, chat-shaped logprobs, and SSE streaming
in OpenAI's order (the role first, content deltas, finish, then a usage chunk when asked)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lamina.loading.chat_template import validate_messages
from lamina.outputs import CompletionOutput
from lamina.sampling_params import SamplingParams
from lamina.server.async_engine import RequestStream
from lamina.server.errors import APIError, internal_error
from lamina.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    DeltaMessage,
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

_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"chat_template", "tools", "tokenize", "add_generation_prompt", "messages"}
)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the template sees them; content parts are joined into one string."""
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"] = "\n".join(p.text or "" for p in m.content if p.type == "text")
        out.append(d)
    return out


def _template_ready(dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant turn with `tool_calls` and `content: null` (as OpenAI's SDK sends it) gets
    `content: ""`, as vLLM renders it: templates concatenate `message['content']` or test it for
    truth, and a missing content would fail the first kind."""
    return [d if d.get("content") is not None else {**d, "content": ""} for d in dicts]


def render_chat(
    sv: Serving,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a conversation, exactly as `LLM.chat` builds them. Template variables from
    the client are passed on, but never a template itself (rendering one is the server's
    choice, and a client-written template could loop for as long as it likes)."""
    tokenizer = sv.require_tokenizer(
        "messages are rendered as text by the chat template", "messages"
    )
    extra = {k: v for k, v in (kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
    dicts = message_dicts(messages)
    try:
        validate_messages(dicts)  # roles and contents, as LLM.chat checks them
    except ValueError as e:
        raise APIError(str(e), 400, param="messages") from None
    try:
        ids = tokenizer.apply_chat_template(
            _template_ready(dicts),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            **extra,
        )
    except Exception as e:  # template errors (raise_exception, missing template, ...)
        raise APIError(f"cannot apply the chat template: {e}", 400, param="messages") from None
    return list(ids)  # type: ignore[arg-type]


async def create_chat_completion(sv: Serving, req: ChatCompletionRequest, raw: Request) -> Response:
    sv.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs=true", 400, param="top_logprobs")
    # the template and tokenizer run off the event loop, which streams every other request
    ids = await asyncio.to_thread(
        render_chat, sv, req.messages, req.add_generation_prompt, req.chat_template_kwargs
    )
    ids = sv.truncate(ids, req.truncate_prompt_tokens)
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else (req.max_tokens)
    )
    top_n = req.top_logprobs or 0
    params = sv.sampling_params(
        req,
        best_of=None,
        max_tokens=sv.resolve_max_tokens(len(ids), max_tokens, "max_tokens"),
        logprobs=top_n if req.logprobs else None,
    )
    stream = await sv.submit([ids], [params])
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        body = _stream(sv, req, len(ids), params, stream, rid)
        return EngineStreamingResponse(body, on_close=stream.close)
    try:
        stream.watch(raw.is_disconnected)
        last = await collect(stream)
    finally:
        stream.close()
    outputs = final_outputs(last[0], req.n)
    choices = [
        ChatChoice(
            index=o.index,
            message=AssistantMessage(content=o.text),
            logprobs=_logprobs(sv, req, o, 0, len(o.token_ids)),
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )
        for o in outputs
    ]
    result = ChatCompletion(
        id=rid, model=sv.model_name, choices=choices, usage=usage(len(ids), outputs)
    )
    return JSONResponse(result.model_dump(mode="json"))


def _logprobs(
    sv: Serving, req: ChatCompletionRequest, o: CompletionOutput, t0: int, t1: int
) -> ChatLogprobs | None:
    if not req.logprobs:
        return None
    entries = (o.logprobs or [])[t0:t1]
    return ChatLogprobs(
        content=sv.chat_logprobs(o.token_ids[t0:t1], entries, req.top_logprobs or 0)
    )


async def _stream(
    sv: Serving,
    req: ChatCompletionRequest,
    num_prompt_tokens: int,
    params: SamplingParams,
    stream: RequestStream,
    rid: str,
) -> AsyncIterator[str]:
    created = int(time.time())
    cursors = [ChoiceCursor() for _ in range(req.n)]
    final: list[CompletionOutput] | None = None

    def chunk(choice: ChatChunkChoice) -> str:
        return sse(
            ChatCompletionChunk(id=rid, created=created, model=sv.model_name, choices=[choice])
        )

    try:
        for i in range(req.n):
            yield chunk(
                ChatChunkChoice(
                    index=i, delta=DeltaMessage(role="assistant", content=""), finish_reason=None
                )
            )
        async for _, out in stream:
            if out is None:  # aborted by the server (shutdown)
                for i, cur in enumerate(cursors):
                    if not cur.finished:
                        cur.finished = True
                        yield chunk(
                            ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason="abort")
                        )
                continue
            final = out.outputs
            for o in out.outputs:
                cur = cursors[o.index]
                if cur.finished:
                    continue
                step = cur.advance(o, params.stop_strings)
                if step is None:
                    continue
                delta, t0, t1 = step
                choice = ChatChunkChoice(
                    index=o.index,
                    delta=DeltaMessage(content=delta) if delta else DeltaMessage(),
                    finish_reason=o.finish_reason,
                )
                if req.logprobs:
                    choice.logprobs = _logprobs(sv, req, o, t0, t1)
                yield chunk(choice)
        if req.stream_options is not None and req.stream_options.include_usage:
            total = usage(num_prompt_tokens, final or [])
            yield sse(
                ChatCompletionChunk(
                    id=rid, created=created, model=sv.model_name, choices=[], usage=total
                )
            )
    except Exception as e:  # the engine failed mid-stream: say so in the stream
        yield sse(internal_error("a /v1/chat/completions stream", e).body())
    yield SSE_DONE
