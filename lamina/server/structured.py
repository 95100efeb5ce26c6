"""Structured output in the server: OpenAI's `response_format`, vLLM's `guided_*` fields and
`structured_outputs` become one `GuidedDecoding`; asking for two at once is a 400 naming both.
The constraint is compiled off the event loop before the request is queued, so a bad schema
is a 400 naming the problem and a slow one never stalls the engine's loop."""

from __future__ import annotations

import asyncio
from typing import Any

from lamina.guided.spec import GuidedDecoding
from lamina.server.errors import APIError
from lamina.server.protocol import SamplingFields
from lamina.server.serving import Serving


def _given(req: SamplingFields) -> list[tuple[str, dict[str, Any]]]:
    """(field, GuidedDecoding kwargs) of each structured-output field the request sets."""
    out: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        out.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.json_schema is not None:
        schema = fmt.json_schema.schema_
        out.append(("response_format", {"json": schema} if schema else {"json_object": True}))
    for field, kind in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, field)
        if value is not None:
            out.append((field, {kind: value}))
    so = req.structured_outputs
    if so is not None:
        kinds = {
            "json": so.json_,
            "regex": so.regex,
            "choice": so.choice,
            "grammar": so.grammar,
            "json_object": so.json_object or None,
        }
        spec: dict[str, Any] = {k: v for k, v in kinds.items() if v is not None}
        if so.disable_any_whitespace is False:
            spec["whitespace_flexible"] = True
        out.append(("structured_outputs", spec))
    return out


def guided_from_request(req: SamplingFields) -> tuple[GuidedDecoding, str] | None:
    """The request's constraint and the field that gave it, or None; a 400 naming the field
    when it is malformed or when two fields ask for one."""
    given = _given(req)
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise APIError(
            f"{names}: give one structured-output constraint per request", 400, param=given[1][0]
        )
    field, kwargs = given[0]
    try:
        return GuidedDecoding(**kwargs), field
    except ValueError as e:
        raise APIError(f"{field}: {e}", 400, param=field) from None


async def structured_request(sv: Serving, req: SamplingFields) -> GuidedDecoding | None:
    """The request's constraint, compiled; None when it asks for none."""
    found = guided_from_request(req)
    if found is None:
        return None
    await compile_guided(sv.engine.engine, *found)
    return found[0]


async def compile_guided(engine: Any, spec: GuidedDecoding, param: str) -> None:
    """Compile `spec` on a worker thread (the engine keeps it cached for the request); a 400
    naming `param` when it does not compile. `engine` is the LLMEngine."""
    try:
        await asyncio.to_thread(engine.grammars.matcher, spec)
    except ValueError as e:
        raise APIError(f"{param}: {e}", 400, param=param) from None
