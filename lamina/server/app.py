"""The FastAPI application: OpenAI routes, tokenizer routes, /health and /metrics, API-key
auth, a body-size bound, and OpenAI-shaped errors for everything (see errors.py).

The API key covers every route but /health (also /metrics, /openapi.json and /docs), and a
Host-header allow-list (localhost names by default) keeps web pages from reaching a local server
through DNS rebinding."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lamina.engine.llm_engine import LLMEngine
from lamina.server.async_engine import AsyncEngine
from lamina.server.chat import create_chat_completion, render_chat
from lamina.server.completions import create_completion
from lamina.server.errors import APIError, install_error_handlers
from lamina.server.limits import LimitsMiddleware
from lamina.server.metrics import CONTENT_TYPE, ServerMetrics
from lamina.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from lamina.server.serving import Serving
from lamina.server.settings import ServerSettings


class BodyLimitMiddleware:
    """Reads each request body up to `max_bytes` before the app sees it (413 beyond), so a
    client cannot make the server buffer or parse an unbounded body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(f"the request body exceeds {self.max_bytes} bytes", 413)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await too_large.response()(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await too_large.response()(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: http.disconnect when the client leaves

        await self.app(scope, replay, send)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lower case."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class HostCheckMiddleware:
    """A 400 for a request whose Host header names none of `allowed_hosts` (names, IP
    addresses, `*.example.com` for any subdomain, `*` for anything): a web page whose DNS name
    its owner re-points at 127.0.0.1 (DNS rebinding) cannot then use a local server through a
    visitor's browser. /health is exempt (probes send the pod's address); a request without a
    Host (HTTP/1.0, no browser sends one) is let through."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] | list[str]) -> None:
        self.app = app
        names = [_host_name(h) for h in allowed_hosts]
        self.allow_all = "*" in names
        self.exact = {h for h in names if not h.startswith("*.")}
        self.suffixes = tuple(h[1:] for h in names if h.startswith("*."))

    def allowed(self, host: str) -> bool:
        if self.allow_all or host in self.exact:
            return True
        return bool(self.suffixes) and host.endswith(self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            raw = dict(scope.get("headers") or []).get(b"host")
            host = _host_name(raw.decode("latin-1")) if raw is not None else None
            if host is not None and not self.allowed(host):
                error = APIError(
                    f"Host {host!r} is not allowed; start the server with --allowed-hosts "
                    "naming it (or '*')",
                    400,
                    code="invalid_host",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: LLMEngine | AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    """An app over `engine`; the engine thread runs while the app's lifespan does."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(settings.served_model_name)
    if isinstance(engine, AsyncEngine):
        async_engine = engine
        async_engine.observer = metrics
    else:
        async_engine = AsyncEngine(engine, metrics, settings.max_pending_requests)
    metrics.attach(async_engine)
    sv = Serving(async_engine, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.drain(0.0)
            await async_engine.stop()

    app = FastAPI(
        title="lamina", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.serving = sv
    app.state.engine = async_engine
    install_error_handlers(app)
    app.add_middleware(HostCheckMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(LimitsMiddleware, settings=settings)  # body, timeouts, in-flight cap

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise APIError(
                "Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
                401,
                code="invalid_api_key",
            )

    api = APIRouter(dependencies=[Depends(check_key)])

    def card() -> ModelCard:
        return ModelCard(id=sv.model_name, root=sv.model_name, max_model_len=sv.max_model_len)

    @api.get("/v1/models", responses={200: {"model": ModelList}})
    async def models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card()]).model_dump(mode="json"))

    @api.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}})
    async def model(model_id: str) -> JSONResponse:
        if model_id != sv.model_name:
            raise APIError(
                f"The model `{model_id}` does not exist; this server serves `{sv.model_name}`.",
                404,
                param="model",
                code="model_not_found",
            )
        return JSONResponse(card().model_dump(mode="json"))

    @api.post("/v1/completions", responses={200: {"model": Completion, "content": _STREAM}})
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await create_completion(sv, req, raw)

    @api.post(
        "/v1/chat/completions", responses={200: {"model": ChatCompletion, "content": _STREAM}}
    )
    async def chat(req: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(sv, req, raw)

    for prefix in ("", "/v1"):
        for path, route, method, result in (
            ("tokenizer_info", tokenizer_info, "GET", TokenizerInfo),
            ("tokenize", tokenize, "POST", TokenizeResponse),
            ("detokenize", detokenize, "POST", DetokenizeResponse),
        ):
            api.add_api_route(
                f"{prefix}/{path}", route, methods=[method], responses={200: {"model": result}}
            )
    app.include_router(api)

    @app.get(
        "/health",
        response_class=Response,
        responses={200: {"description": "The server is up (an empty body)"}},
    )
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics", dependencies=[Depends(check_key)], include_in_schema=False)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", dependencies=[Depends(check_key)], include_in_schema=False)
    async def openapi_route() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=[Depends(check_key)], include_in_schema=False)
    async def docs_route() -> HTMLResponse:
        # the page fetches /openapi.json without the key: with --api-key, read that instead
        return get_swagger_ui_html(openapi_url="/openapi.json", title="lamina")

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    return app


# a streamed answer (`"stream": true`): server-sent events; the schema describes one event (as
# OpenAPI before 3.2 reads it), whose data is a JSON chunk (or an ErrorResponse), the last [DONE]
_STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {"data": {"type": "string"}},
            "required": ["data"],
        }
    }
}

# Error statuses the server sends, each with ErrorResponse's body (errors.py): on every route
# but /health; on routes with a body; on the generating routes; on one route.
_ERRORS = {
    "400": "Invalid request (or a Host header outside --allowed-hosts)",
    "401": "Missing or wrong API key (with --api-key)",
    "429": "Too many requests in flight (--max-in-flight-requests); retry later",
    "500": "Internal error: the message has an id under which the server logged it",
}
_BODY_ERRORS = {
    "408": "The body came too slowly (--body-read-timeout, --body-timeout)",
    "413": "The body is too large (--max-body-bytes)",
}
_ENGINE_ERRORS = {
    "503": "Too many pending requests, or shutting down; retry later",
    "504": "The request ran longer than --request-timeout",
}
_ROUTE_ERRORS = {"/v1/models/{model_id}": {"404": "No such model (model_not_found)"}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the statuses the server really sends: an invalid request is a
    400 with OpenAI's error body (errors.py), never a 422 with FastAPI's; every error status a
    route can answer is listed with that body."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        ref = "#/components/schemas/{model}"
        error = ErrorResponse.model_json_schema(ref_template=ref)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(error.pop("$defs", {}))
        schemas["ErrorResponse"] = error
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        content = {"application/json": {"schema": {"$ref": ref.format(model="ErrorResponse")}}}
        for path, operations in schema.get("paths", {}).items():
            if path == "/health":
                continue
            for op in operations.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                errors = {**_ERRORS, **_ROUTE_ERRORS.get(path, {})}
                if "requestBody" in op:
                    errors.update(_BODY_ERRORS)
                if path in ("/v1/completions", "/v1/chat/completions"):
                    errors.update(_ENGINE_ERRORS)
                for status in sorted(errors):
                    responses[status] = {"description": errors[status], "content": content}
        app.openapi_schema = schema
    return app.openapi_schema


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


async def tokenizer_info(request: Request) -> JSONResponse:
    sv = _serving(request)
    tok = sv.tokenizer
    info = TokenizerInfo(
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        unk_token=tok.unk_token,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        add_bos_token=tok.add_bos_token,
        add_eos_token=tok.add_eos_token,
        chat_template=tok.chat_template,
        model_max_length=sv.max_model_len,
        vocab_size=tok.vocab_size,
    )
    return JSONResponse(info.model_dump(mode="json"))


async def tokenize(req: TokenizeRequest, request: Request) -> JSONResponse:
    sv = _serving(request)
    sv.check_model(req.model)
    if req.messages is not None:
        ids = await asyncio.to_thread(render_chat, sv, req.messages, req.add_generation_prompt)
    elif req.prompt is not None:
        ids = await asyncio.to_thread(sv.encode, req.prompt, req.add_special_tokens)
    else:
        raise APIError("give either prompt or messages", 400, param="prompt")
    strs = sv.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    result = TokenizeResponse(
        count=len(ids), max_model_len=sv.max_model_len, tokens=ids, token_strs=strs
    )
    return JSONResponse(result.model_dump(mode="json", exclude_none=True))


async def detokenize(req: DetokenizeRequest, request: Request) -> JSONResponse:
    sv = _serving(request)
    sv.check_model(req.model)
    bad = [t for t in req.tokens if not 0 <= t < sv.tokenizer.vocab_size]
    if bad:
        raise APIError(f"token ids {bad[:5]} are outside the vocabulary", 400, param="tokens")
    return JSONResponse(DetokenizeResponse(prompt=sv.tokenizer.decode(req.tokens)).model_dump())
