"""Property-based fuzzing of the HTTP API with schemathesis, from the server's own OpenAPI
document, in process (the ASGI app over the tiny random model, no network): every generated
request, valid or not, must get no 5xx and a response the document describes (status, content
type, body schema).

schemathesis' own pytest loader (`schemathesis.pytest.from_fixture`) does not work with pytest 9
(it reads `request.node._nodeid`), so each operation's strategy is driven by hypothesis here.
About half the requests of positive mode are steered to the served model and OpenAI's roles, so
that generation, streaming and the tokenizer are reached, not only the 400 of a random name."""

from __future__ import annotations

import os
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lamina import LLM  # noqa: E402
from lamina.server import ServerSettings, build_app  # noqa: E402
from tests.helpers import SERVED_MODEL_NAME as MODEL  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# every operation of the document (test_every_operation_is_fuzzed keeps the list whole)
OPERATIONS = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/tokenizer_info"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/tokenizer_info"),
    ("POST", "/v1/tokenize"),
    ("POST", "/v1/detokenize"),
    ("GET", "/health"),
]
# invalid input exists only where a request carries some (the path parameter takes any text)
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]
# per operation and mode: the module takes about 30 s on 2 cores; raise it for a deeper run
MAX_EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "60"))
ROLES = ("user", "assistant", "system", "user")


@pytest.fixture(scope="module")
def api_schema(tiny_folder):
    from schemathesis.python import asgi

    llm = LLM(str(tiny_folder), dtype="float32")
    # the test client's Host is asgi.HOST; small bounds keep generated requests quick
    settings_ = ServerSettings(
        served_model_name=MODEL, allowed_hosts=(asgi.HOST,), max_n=2, max_prompt_tokens=64
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(llm.engine, settings_))
    yield schema
    asgi.shutdown_lifespans()  # the app's lifespan (the engine thread) ends here


def test_every_operation_is_fuzzed(api_schema):
    ops = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert ops == set(OPERATIONS)


def _clamp(lo: float, hi: float) -> Any:
    return lambda v: min(max(v, lo), hi) if isinstance(v, int | float) else v


# what a steered request keeps of the generated body, numbers brought into range; the rest
# (penalties, token id lists, bounds of each other) would make nearly every request a 400
KEEP = {
    **dict.fromkeys(("prompt", "messages", "stop", "user", "echo", "stream", "stream_options")),
    **dict.fromkeys(("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")),
    **dict.fromkeys(("add_generation_prompt", "tokens", "add_special_tokens")),
    **dict.fromkeys(("return_token_strs", "logprobs")),
    "temperature": _clamp(0, 2),
    "top_p": _clamp(0.01, 1),
    "top_k": _clamp(-1, 50),
    "n": _clamp(1, 2),
    "seed": _clamp(0, 2**32),
    "max_tokens": _clamp(1, 4),
    "max_completion_tokens": _clamp(1, 4),
    "top_logprobs": _clamp(0, 5),
}


def _steer(case: Any, steer: bool) -> Any:
    """A generated case, with (when `steer`) the served model's name, OpenAI's roles and
    numbers in range (see KEEP), so that the request can pass validation and run."""
    if steer and isinstance(case.body, dict):
        body = {k: (KEEP[k] or (lambda v: v))(v) for k, v in case.body.items() if k in KEEP}
        body["model"] = MODEL
        if isinstance(body.get("logprobs"), int) and not isinstance(body["logprobs"], bool):
            body["logprobs"] = min(max(body["logprobs"], 0), 5)
        if body.get("stream_options") is not None:
            body["stream"] = True
        for i, m in enumerate(body.get("messages") or []):
            if isinstance(m, dict):
                m["role"] = ROLES[i % len(ROLES)]
                if not isinstance(m.get("content"), str):
                    m["content"] = "hi"
        case.body = body
    elif steer and case.path_parameters:
        case.path_parameters["model_id"] = MODEL
    return case


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz(api_schema, method, path, mode):
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE:
        strategy = st.tuples(strategy, st.booleans()).map(lambda t: _steer(*t))

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same requests on every run: a failure is reproducible
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    run()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streams_conform(api_schema, path):
    """A stream for certain (random examples reach one only now and then)."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 3, "stream": True, "logprobs": True}
    if "chat" in path:
        body.update(messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    else:
        body.update(prompt="hi", logprobs=2, echo=True)
    body["stream_options"] = {"include_usage": True}
    case = api_schema[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call_and_validate(checks=CHECKS)
    assert response.status_code == 200
    assert response.headers["content-type"][0].startswith("text/event-stream")
