"""Pydantic models of every request and response body, in OpenAI's shapes (plus vLLM's extra
sampling fields), so the openai SDK, lm-eval and vLLM clients work unchanged.

Requests are strict: a field lamina does not implement (OpenAI's `audio`, a misspelled
`max_token`) is a 400 naming it instead of being silently ignored; vLLM's extra fields that
lamina implements are accepted. So are wrongly typed known fields, non-finite numbers (Python's
json reads the literals NaN and Infinity) and strings that are not valid Unicode (a lone
surrogate such as "\ud800", which no tokenizer can encode): each a 400 naming the field (see
errors.py). Chat messages keep unknown keys (tool_calls, name, ...) for the template. Value
ranges are checked once, by `SamplingParams`, so the server and the offline API agree.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


def _invalid_unicode(value: Any, path: str) -> str | None:
    """The path of the first string in `value` that is not valid Unicode (UTF-8 cannot encode
    a lone surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _invalid_unicode(key, "") is not None:
            return f"{path}.{key!r}".lstrip(".")
        found = _invalid_unicode(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


_ANY = None  # any value asks for nothing (metadata, tags)

# Fields of OpenAI's API and vLLM's documented extras that lamina does not implement: accepted
# (and dropped) only with a value that asks for nothing ("tools": [], "use_beam_search": false),
# otherwise a 400 naming them. Anything else unknown is a 400 too (extra="forbid").
_NEUTRAL: dict[str, tuple[Any, ...] | None] = {
    # OpenAI
    "store": (None, False),
    "metadata": _ANY,
    "service_tier": _ANY,
    # vLLM
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "spaces_between_special_tokens": (None, True),
    "prompt_logprobs": (None,),
    "guided_decoding_backend": (None, "llguidance", "guidance"),
    "guided_whitespace_pattern": (None,),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "priority": (None, 0),
    "request_id": _ANY,
}
_NEUTRAL_CHAT: dict[str, tuple[Any, ...] | None] = {
    **_NEUTRAL,
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "echo": (None, False),
    "continue_final_message": (None, False),
    "add_special_tokens": (None, False),
    "documents": (None,),
    "chat_template": (None,),
    "mm_processor_kwargs": (None,),
}
_NEUTRAL_COMPLETION = {**_NEUTRAL, "add_special_tokens": (None, True)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    neutral_fields: ClassVar[dict[str, tuple[Any, ...] | None]] = {}

    @model_validator(mode="before")
    @classmethod
    def _valid_input(cls, data: Any) -> Any:
        bad = _invalid_unicode(data, "")
        if bad is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{field}: the string is not valid Unicode (a lone UTF-16 surrogate?)",
                {"field": bad},
            )
        if not isinstance(data, dict) or not cls.neutral_fields:
            return data
        dropped = {k for k in data if k in cls.neutral_fields and k not in cls.model_fields}
        for key in sorted(dropped):
            accepted = cls.neutral_fields[key]
            if accepted is not None and not any(_same(data[key], v) for v in accepted):
                raise PydanticCustomError(
                    "unsupported_field",
                    "{field}: lamina does not implement it (accepted only as {accepted})",
                    {"field": key, "accepted": " or ".join(json.dumps(v) for v in accepted)},
                )
        return {k: v for k, v in data.items() if k not in dropped} if dropped else data


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def model_post_init(self, context: Any, /) -> None:
        # Streaming chunks are dumped with exclude_unset (so a delta carries only what it
        # sets); these defaults must still always be sent.
        for name in ("object", "created"):
            if name in type(self).model_fields:
                self.__pydantic_fields_set__.add(name)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    """OpenAI's response_format.json_schema. The schema is always enforced (whatever `strict`
    says): the output is a JSON value the schema accepts."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError(
                "response_format",
                "response_format: json_schema is given exactly when type is 'json_schema'",
                {"field": "response_format"},
            )
        return self


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` extra field (set one kind)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None


class SamplingFields(_Request):
    """Fields both generation endpoints share; the last group are vLLM's extra body fields."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras (send them with the SDK's `extra_body`)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    # structured output: OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "stream_options_without_stream",
                "stream_options is only allowed when stream is true",
                {"field": "stream_options"},
            )
        return self


class CompletionRequest(SamplingFields):
    neutral_fields = _NEUTRAL_COMPLETION
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Request):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # validate_messages names
    type: str = "text"
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # tool_calls, name, ...
    role: str
    content: str | list[ContentPart] | None = None


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    neutral_fields = _NEUTRAL_CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


# ---- responses ----------------------------------------------------------------------------
class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """Every error, of every status (errors.py); the OpenAPI document names it for 400."""

    error: ErrorInfo


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Response):
    """The legacy completions shape (lm-eval reads it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def model_post_init(self, context: Any, /) -> None:
        # filled by appending, so never "set": without this a streamed chunk sent `{}`
        super().model_post_init(context)
        self.__pydantic_fields_set__.update(type(self).model_fields)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None = None


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaToolCall(_Response):
    """A streamed tool call: lamina sends each call whole, in one delta, once it is complete."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lamina"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- tokenizer endpoints (vLLM's shapes; lm-eval's RemoteTokenizer reads them) -------------
class TokenizeRequest(_Request):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # vLLM's helpers: lenient
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # vLLM's helpers: lenient
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class TokenizerInfo(_Response):
    tokenizer_class: str = "PreTrainedTokenizerFast"
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    model_max_length: int
    vocab_size: int


REQUEST_FIELDS = sorted(
    {name for model in (CompletionRequest, ChatCompletionRequest) for name in model.model_fields}
)
"""Every field a request may carry (errors.py suggests the closest to a misspelled one)."""
