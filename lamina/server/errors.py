"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Clients (the openai SDK, lm-eval, curl scripts) branch on the status and read `error.message`,
so every failure the server can produce, including FastAPI's own validation and routing
errors, goes through here instead of FastAPI's `{"detail": ...}` default. Every invalid request
is a 400 (OpenAI's status; the OpenAPI document says so too, see app.py), never FastAPI's 422.
A failure of the server itself is a 500 that says only that, with an id to find the traceback
in the server's log: no exception text, type or path reaches the client.
"""

from __future__ import annotations

import difflib
import logging
import re
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lamina.server.async_engine import ClientDisconnectedError
from lamina.server.protocol import REQUEST_FIELDS

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


def internal_error(where: str, exc: BaseException) -> APIError:
    """The 500 for a failure of the server: logged with its traceback under an id that is all
    the client sees of it. An APIError is the client's and is passed on as it is."""
    if isinstance(exc, APIError):
        return exc
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s in %s", error_id, where, exc_info=exc)
    return APIError(f"internal server error (id {error_id}; the server's log has the details)", 500)


# pydantic's name for a member of a union in an error's loc ("str", "list[int]", "ContentPart"):
# no request field is spelled so
_UNION_MEMBER = re.compile(r"^(?:str|int|float|bool|none|[A-Z]\w*|[\w-]+\[.*\])$")


def _field_path(loc: Any) -> tuple[list[str], str | None]:
    """An error's loc up to the first name of a union member (the field a client wrote), and
    that name (None when there is none)."""
    path: list[str] = []
    for x in loc:
        if x == "body" and not path:
            continue
        if isinstance(x, str) and _UNION_MEMBER.match(x):
            return path, x
        path.append(str(x))
    return path, None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type")
    if kind == "json_invalid":
        return APIError(f"malformed JSON body: {first.get('msg', 'cannot parse')}", 400)
    field = (first.get("ctx") or {}).get("field")
    if isinstance(field, str):  # protocol.py's own checks name the field in ctx
        return APIError(first.get("msg", "invalid request"), 400, param=field)
    loc, member = _field_path(first.get("loc", ()))
    kinds: list[str] = []
    if member is not None:  # the members of the union at loc, each with an error (none fits)
        paths = [_field_path(e.get("loc", ())) for e in errors]
        kinds = list(dict.fromkeys(m for path, m in paths if path == loc and m is not None))
    msg = first.get("msg", "invalid request")
    if len(kinds) > 1:  # name the field and the types it takes
        msg = f"invalid value; it must be {', '.join(kinds[:-1])} or {kinds[-1]}"
    else:  # not a union after all (a dict key spelled like a type): the loc as it is
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if kind == "extra_forbidden" and loc:
        names = [f for f in REQUEST_FIELDS if f != loc[-1]]
        close = difflib.get_close_matches(loc[-1], names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        msg = f"unknown field, which lamina does not implement{hint}"
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
        return internal_error(f"{request.method} {request.url.path}", exc).response()
