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

from lamina.guided.spec import GuidedDecoding
from lamina.loading.chat_template import select_template, validate_messages
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
    DeltaToolCall,
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
from lamina.server.structured import compile_guided, guided_from_request, structured_request
from lamina.server.tools import ToolCallParser, ToolUse, messages_for_template, template_reads_tools

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
    tools: ToolUse | None = None,
) -> list[int]:
    """Token ids of a conversation, exactly as `LLM.chat` builds them. Template variables from
    the client are passed on, but never a template itself (rendering one is the server's
    choice, and a client-written template could loop for as long as it likes). Tools reach
    the template as server/tools.py describes."""
    tokenizer = sv.require_tokenizer(
        "messages are rendered as text by the chat template", "messages"
    )
    extra = {k: v for k, v in (kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
    dicts = message_dicts(messages)
    try:
        validate_messages(dicts)  # roles and contents, as LLM.chat checks them
    except ValueError as e:
        raise APIError(str(e), 400, param="messages") from None
    offered = tools.schemas() if tools is not None and tools.active else None
    try:
        native = template_reads_tools(select_template(tokenizer.chat_templates, None, offered))
        ids = tokenizer.apply_chat_template(
            messages_for_template(_template_ready(dicts), tools, native),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            tools=offered if native else None,
            **extra,
        )
    except Exception as e:  # template errors (raise_exception, missing template, ...)
        raise APIError(f"cannot apply the chat template: {e}", 400, param="messages") from None
    return list(ids)  # type: ignore[arg-type]


async def create_chat_completion(sv: Serving, req: ChatCompletionRequest, raw: Request) -> Response:
    sv.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs=true", 400, param="top_logprobs")
    tools = ToolUse.from_request(req)
    guided = await _constraint(sv, req, tools)
    # the template and tokenizer run off the event loop, which streams every other request
    ids = await asyncio.to_thread(
        render_chat, sv, req.messages, req.add_generation_prompt, req.chat_template_kwargs, tools
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
        guided=guided,
    )
    stream = await sv.submit([ids], [params])
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        body = _stream(sv, req, len(ids), params, stream, rid, tools)
        return EngineStreamingResponse(body, on_close=stream.close)
    try:
        stream.watch(raw.is_disconnected)
        last = await collect(stream)
    finally:
        stream.close()
    outputs = final_outputs(last[0], req.n)
    choices = []
    for o in outputs:
        message = AssistantMessage(content=o.text)
        parser = _parser(tools)
        if parser is not None:
            content, calls = parser.feed(o.text, done=True)
            if calls:  # OpenAI: no content beside calls, unless the model wrote some
                message = AssistantMessage(content=content.strip() or None, tool_calls=calls)
            else:
                message = AssistantMessage(content=content)
        choices.append(
            ChatChoice(
                index=o.index,
                message=message,
                logprobs=_logprobs(sv, req, o, 0, len(o.token_ids)),
                finish_reason=_finish_reason(o.finish_reason, parser),
                stop_reason=o.stop_reason,
            )
        )
    result = ChatCompletion(
        id=rid, model=sv.model_name, choices=choices, usage=usage(len(ids), outputs)
    )
    return JSONResponse(result.model_dump(mode="json"))


async def _constraint(
    sv: Serving, req: ChatCompletionRequest, tools: ToolUse | None
) -> GuidedDecoding | None:
    """The output's constraint: tool_choice "required" / a named function, or a structured
    output field (not both: a 400)."""
    calls = tools.grammar() if tools is not None else None
    if calls is None:
        return await structured_request(sv, req)
    if guided_from_request(req) is not None:
        raise APIError(
            "tool_choice asks for a tool call, which leaves no room for response_format / "
            "guided_* / structured_outputs; give one of them",
            400,
            param="tool_choice",
        )
    await compile_guided(sv.engine.engine, calls, "tools")
    return calls


def _parser(tools: ToolUse | None) -> ToolCallParser | None:
    if tools is None or not tools.active:
        return None
    return ToolCallParser(tools.names, tools.parallel)


def _finish_reason(reason: str | None, parser: ToolCallParser | None) -> str | None:
    """OpenAI's "tool_calls" when the model ended its turn with calls."""
    if reason == "stop" and parser is not None and parser.calls:
        return "tool_calls"
    return reason


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
    tools: ToolUse | None,
) -> AsyncIterator[str]:
    created = int(time.time())
    cursors = [ChoiceCursor() for _ in range(req.n)]
    parsers = [_parser(tools) for _ in range(req.n)]
    released = [""] * req.n  # text each cursor has let out (the parser's input)
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
                message = DeltaMessage(content=delta) if delta else DeltaMessage()
                parser = parsers[o.index]
                if parser is not None:
                    released[o.index] += delta
                    message = _tool_delta(parser, released[o.index], cur.finished)
                    if not (cur.finished or message.content or message.tool_calls or req.logprobs):
                        continue  # text held back: it may be the start of a call
                choice = ChatChunkChoice(
                    index=o.index,
                    delta=message,
                    finish_reason=_finish_reason(o.finish_reason, parser),
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


def _tool_delta(parser: ToolCallParser, text: str, done: bool) -> DeltaMessage:
    """The content and the completed calls that `text` (all released so far) adds."""
    before = len(parser.calls)
    content, calls = parser.feed(text, done)
    message = DeltaMessage(content=content) if content else DeltaMessage()
    if calls:
        message.tool_calls = [
            DeltaToolCall(index=before + k, id=c.id, function=c.function)
            for k, c in enumerate(calls)
        ]
    return message
