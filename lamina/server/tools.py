"""OpenAI tool calling over any chat model: how tools reach the prompt, how `tool_choice`
constrains the output, and how tool calls are read back out of the text.

The call format is the Hermes one (NousResearch's, also Qwen2.5's and SmolLM3's templates):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that reads `tools` renders them itself (as transformers' `apply_chat_template`
passes them). A template that does not (SmolLM2's, most small models') gets the tools and this
format described in the system message, and earlier turns are rewritten into the same
convention: an assistant's `tool_calls` become `<tool_call>` blocks of its text, a `tool`
message becomes a user turn holding a `<tool_response>` block (the Qwen2.5 template's way).

`tool_choice`: "none" leaves the tools out of the prompt; "auto" lets the model choose, and
its text is parsed; "required" and a named function constrain the output with a grammar
(`<tool_call>` blocks whose JSON follows the function's `parameters` schema: one for a named
function, one or more for "required" unless parallel_tool_calls is false), so the arguments
always parse. Streaming sends each call whole, in one delta, once its block closes;
text that may still become a call is held back meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lamina.guided.spec import GuidedDecoding
from lamina.server.errors import APIError
from lamina.server.protocol import ChatCompletionRequest, ChatTool, FunctionCall, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# JSON as json.dumps writes it, inside grammars (llguidance's per-schema options)
_SPACED = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def template_reads_tools(template: str | None) -> bool:
    return template is not None and re.search(r"\btools\b", template) is not None


@dataclass
class ToolUse:
    """The tools of one chat request and what `tool_choice` asks."""

    tools: list[ChatTool]
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @classmethod
    def from_request(cls, req: ChatCompletionRequest) -> ToolUse | None:
        """None when the request has no tools; 400s for a tool_choice that cannot be met."""
        tools = req.tools or []
        choice = req.tool_choice
        if not tools:
            if choice not in (None, "none", "auto"):
                raise APIError(
                    "tool_choice asks for a tool call but the request has no tools",
                    400,
                    param="tool_choice",
                )
            return None
        names = [t.function.name for t in tools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise APIError(f"tools: function names must be unique; repeated: {dup}", param="tools")
        if choice is None or isinstance(choice, str):
            return cls(tools, choice or "auto", parallel=req.parallel_tool_calls)
        if choice.function.name not in names:
            raise APIError(
                f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                f"({', '.join(names)})",
                400,
                param="tool_choice",
            )
        return cls(tools, "named", choice.function.name, req.parallel_tool_calls)

    @property
    def names(self) -> list[str]:
        return [t.function.name for t in self.tools]

    @property
    def active(self) -> bool:
        """Whether the model is offered the tools (the prompt lists them, output is parsed)."""
        return self.choice != "none"

    def schemas(self) -> list[dict[str, Any]]:
        """The tools as chat templates receive them (OpenAI's shape)."""
        return [t.model_dump(exclude_none=True) for t in self.tools]

    # ---- the prompt --------------------------------------------------------------------
    def system_prompt(self) -> str:
        lines = "\n".join(json.dumps(t["function"]) for t in self.schemas())
        return (
            "You can call functions to help answer. The functions, one JSON signature per line:\n"
            f"<tools>\n{lines}\n</tools>\n"
            "To call a function, answer with one JSON object per call, each inside "
            "<tool_call></tool_call> tags:\n"
            f'{OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n{CLOSE}'
        )

    def grammar(self) -> GuidedDecoding | None:
        """The constraint for "required" / a named function (None otherwise)."""
        if self.choice not in ("required", "named"):
            return None
        tools = [
            t for t in self.tools if self.choice == "required" or t.function.name == self.named
        ]
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        body = json.dumps({**schema, "x-guidance": _SPACED})
        # a named function is called once; "required" allows more calls when parallel
        many = self.parallel and self.choice == "required"
        repeat = ' ("\\n" call)*' if many else ""
        lark = f'start: call{repeat}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {body}'
        return GuidedDecoding(grammar=lark)


def messages_for_template(
    messages: list[dict[str, Any]], tools: ToolUse | None, native: bool
) -> list[dict[str, Any]]:
    """Messages ready for the chat template. Native templates get tool-call arguments as
    mappings (they write them with `tojson`); other templates get the Hermes convention in
    plain text, with the tools described in the system message when they are offered."""
    if native:
        return [_arguments_as_objects(m) for m in messages]
    out = [_as_text_turn(m) for m in messages]
    if tools is not None and tools.active:
        prompt = tools.system_prompt()
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):  # else shown as the text it is
                fn["arguments"] = json.loads(args)
        fixed.append({**call, "function": fn})
    return {**message, "tool_calls": fixed}


def _as_text_turn(message: dict[str, Any]) -> dict[str, Any]:
    role = message.get("role")
    if role == "tool":
        return {
            "role": "user",
            "content": f"<tool_response>\n{message.get('content')}\n</tool_response>",
        }
    calls = message.get("tool_calls")
    if role != "assistant" or not calls:
        return message
    blocks = []
    for call in calls:
        fn = _arguments_as_objects({"tool_calls": [call]})["tool_calls"][0]["function"]
        call_json = json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")})
        blocks.append(f"{OPEN}\n{call_json}\n{CLOSE}")
    text = "\n".join([message.get("content") or "", *blocks]).strip()
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": text}


# ---- reading calls back ------------------------------------------------------------------
def _new_call(body: str, names: list[str]) -> ToolCall | None:
    """A ToolCall from a block's JSON, or None when it is not a call of a known function."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError:
            return None
        text = args
    else:
        text = json.dumps(args, ensure_ascii=False)
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=data["name"], arguments=text)
    )


class ToolCallParser:
    """Splits a growing output into content and tool calls. `feed(text, done)` takes the whole
    text so far and returns (content not sent before, calls completed since). A block that is
    not a call of a known function stays content. Without tags, a whole output that is one
    call's JSON (`{"name": ..., "arguments": ...}`) counts as a call (models not trained on the
    tags often answer so)."""

    def __init__(self, names: list[str], parallel: bool = True) -> None:
        self.names = names
        self.parallel = parallel
        self.pos = 0  # text before this is settled (sent as content or parsed as calls)
        self.calls: list[ToolCall] = []
        self._strip_next = False  # drop the whitespace that follows a call

    def feed(self, text: str, done: bool) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        new: list[ToolCall] = []
        while True:
            start = text.find(OPEN, self.pos)
            if start == -1:
                break
            end = text.find(CLOSE, start)
            if end == -1 and not done:  # inside a block: what precedes it is settled
                before = text[self.pos : start].rstrip()  # (its end is layout if a call follows)
                content.append(self._after_call(before))
                self.pos += len(before)
                return self._content(content), new
            stop = len(text) if end == -1 else end + len(CLOSE)
            call = _new_call(text[start + len(OPEN) : end if end != -1 else len(text)], self.names)
            before = text[self.pos : start]
            if call is None:
                content.append(before + text[start:stop])
            else:  # the whitespace around a call is layout, not content
                content.append(self._after_call(before).rstrip())
                if self.parallel or not self.calls:
                    new.append(call)
                    self.calls.append(call)
                self._strip_next = True
            self.pos = stop
        rest = text[self.pos :]
        if not self.calls and not new and rest.lstrip().startswith("{") and self.pos == 0:
            if not done:  # maybe a bare JSON call: wait for the end
                return self._content(content), new
            call = _new_call(rest, self.names)
            if call is not None:
                self.calls.append(call)
                self.pos = len(text)
                return self._content(content), [call]
        held = 0
        if not done:  # a partial tag, and the whitespace before it, may still precede a call
            held = _partial_tag(rest)
            held += len(rest[: len(rest) - held]) - len(rest[: len(rest) - held].rstrip())
        content.append(self._after_call(rest[: len(rest) - held]))
        self.pos = len(text) - held
        return self._content(content), new

    def _after_call(self, text: str) -> str:
        """`text` as content; right after a call its leading whitespace is dropped."""
        if self._strip_next:
            text = text.lstrip()
            self._strip_next = not text
        return text

    def _content(self, parts: list[str]) -> str:
        return "".join(parts)


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that begins `<tool_call>`."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0
