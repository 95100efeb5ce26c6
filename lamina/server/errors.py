"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Clients (the openai SDK, lm-eval, curl scripts) branch on the status and read `error.message`,
so every failure the server can produce, including FastAPI's own validation and routing
errors, goes through here instead of FastAPI's `{"detail": ...}` default.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lamina.server.async_engine import ClientDisconnectedError

logger = logging.getLogger("lamina.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A failure to report to the client with a status and OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or _TYPES.get(status, "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_value_error(e: ValueError, default_param: str | None = None) -> APIError:
    """SamplingParams and the engine name the field first ("top_p=2 is invalid; ..."), so the
    field becomes `param`."""
    m = re.match(r"(\w+)=", str(e))
    return APIError(str(e), 400, param=m.group(1) if m else default_param)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(f"malformed JSON body: {first.get('msg', 'cannot parse')}", 400)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        msg = "the request body must be a JSON object (Content-Type: application/json)"
    return APIError(f"{param + ': ' if param else ''}{msg}", 400, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif status == 405:
            message = f"Method {request.method} not allowed for {request.url.path}"
        else:
            message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
        return APIError(message, status).response()

    @app.exception_handler(ClientDisconnectedError)
    async def _gone(request: Request, exc: ClientDisconnectedError) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(f"internal server error: {type(exc).__name__}", 500).response()
