"""Chat templates: pick one and render it the way transformers does.

Models ship their prompt format as a Jinja template; any difference from transformers' rendering
(whitespace trimming, `tojson`, the helper globals) changes the prompt and so the model's output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning may come under; transformers copies one to the others so a template
# reading any of them sees it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_templates(value: Any) -> dict[str, str]:
    """`{name: template}` from a string or from the `[{name, template}, ...]` list form."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return {str(item["name"]): str(item["template"]) for item in value}
    raise ValueError(
        f"A chat template must be a string or a list of {{name, template}}; got {value!r}."
    )


def folder_templates(folder: Path, config_value: Any) -> dict[str, str]:
    """A HF folder's templates: chat_template.jinja / chat_template.json and
    additional_chat_templates/*.jinja win over tokenizer_config.json's entry, as in HF."""
    files = {}
    if (folder / "chat_template.json").is_file():
        data = json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))
        files["default"] = data["chat_template"]
    if (folder / "chat_template.jinja").is_file():
        files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for extra in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        files[extra.stem] = extra.read_text(encoding="utf-8")
    return normalize_templates(files or config_value)


def select_template(
    templates: Mapping[str, str], chat_template: str | None = None, tools: Any = None
) -> str:
    """The template to render: an explicit one (or its name), else "tool_use"/"default" as in HF."""
    if chat_template is not None:
        return templates.get(chat_template, chat_template)
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if not templates:
        raise ValueError(
            "This model has no chat template, so a conversation cannot be turned into a prompt. "
            "Pass one with apply_chat_template(..., chat_template=JINJA_STRING), or set "
            "Tokenizer.chat_template, or encode a plain prompt instead."
        )
    raise ValueError(
        "This model has several chat templates and none is named 'default'; pass "
        f"chat_template=NAME, one of {sorted(templates)}."
    )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in HF templates; we only
    need the text, so the block renders its body unchanged (without it such templates fail)."""

    tags = {"generation"}  # noqa: RUF012 - jinja2.ext.Extension declares it an instance field

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, closing a sandbox escape (as in HF)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    """`dict(...)` for templates without handing them the `dict` class itself (as in HF)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template string; the environment matches transformers'."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


# The roles of OpenAI's chat API ("developer" is its newer name for "system").
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def validate_messages(messages: Any, name: str = "messages") -> None:
    """Check that a conversation has the shape of OpenAI's chat API before a template renders
    it (`LLM.chat`, `lamina chat`, the server): a non-empty list of dicts, each with a `role` in
    CHAT_ROLES and a `content` that is a string or a list of text parts
    (`{"type": "text", "text": "..."}`); an assistant message with `tool_calls` may have no
    content. Raises a ValueError that names the message (`messages[2]`) and the problem.

    `Tokenizer.apply_chat_template` itself, like transformers', renders any roles and keys a
    template understands and checks only the structure (see `render_chat_template`)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(
            f"{name} must be a list of {{'role': ..., 'content': ...}} dicts, got "
            f"{type(messages).__name__}"
        )
    if not messages:
        raise ValueError(f"{name} is empty; a conversation needs at least one message")
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} is a {type(message).__name__}, not a dict with 'role' and 'content'"
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            problem = "has no 'role'" if role is None else f"has role {role!r}"
            raise ValueError(f"{where} {problem}; accepted roles: {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue
            hint = " (an assistant message may omit it only with 'tool_calls')"
            raise ValueError(
                f"{where} ({role}) has no 'content'{hint if role == 'assistant' else ''}"
            )
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(
                f"{where} ({role}): content must be a string or a list of text parts, got "
                f"{type(content).__name__}"
            )
        for j, part in enumerate(content):
            if not (
                isinstance(part, Mapping)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise ValueError(
                    f"{where} ({role}): content[{j}] is not a text part "
                    f"{{'type': 'text', 'text': '...'}} (lamina reads text only): {part!r:.80}"
                )


def _check_structure(messages: Any) -> None:
    """What any template needs: a non-empty list of dicts, each with a string `role`."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("Cannot apply a chat template to an empty conversation.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] is a {type(message).__name__}, not a dict with 'role' and 'content'"
            )
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] has no 'role' (a string such as 'user')")


def _prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies with None-valued keys dropped and reasoning aliased, as transformers passes them."""
    out = []
    for message in messages:
        msg = {k: v for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `source` for one conversation; extra kwargs override the special-token names.

    Any role and key a template understands is passed on (as transformers does); a message
    that is not a dict or has no role is a ValueError naming it, and so is a template reading
    the `content` of a message that has none (instead of jinja2's "'dict object' has no
    attribute 'content'")."""
    _check_structure(messages)
    variables = {**special_tokens, **template_kwargs}
    try:
        return compile_template(source).render(
            messages=_prepare_messages(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.UndefinedError as e:
        missing = [i for i, m in enumerate(messages) if m.get("content") is None]
        if not missing:
            raise
        i = missing[0]
        raise ValueError(
            f"messages[{i}] ({messages[i]['role']}) has no 'content', which the chat template "
            f"reads ({e})"
        ) from e
