"""What a constrained request asks for: a JSON schema, any JSON, a regex, a choice or a grammar.

This is the user-facing description only (it lives in `SamplingParams`, so it is validated
when the params are made and carries no compiled state); a `GrammarBackend`
(`guided/backend.py`) turns it into a matcher when the request is admitted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _schema_of(value: Any) -> dict[str, Any] | bool:
    """A JSON schema from a dict, a JSON string or a pydantic model class."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        schema = value.model_json_schema()
    elif isinstance(value, str):
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"guided json is not valid JSON ({e}); give a JSON schema") from e
    else:
        schema = value
    if not isinstance(schema, (dict, bool)):
        raise ValueError(
            f"guided json={value!r} is invalid; give a JSON schema (a dict, a JSON string or a "
            "pydantic model class)"
        )
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ValueError(f"guided json schema cannot be written as JSON: {e}") from e
    return schema


@dataclass(frozen=True)
class GuidedDecoding:
    """Constrain a request's output (vLLM's `StructuredOutputsParams`; set exactly one kind).

    json: a JSON schema (dict, JSON string, or a pydantic model class): the output is a JSON
        value valid under it. json_object: any JSON object (OpenAI's `{"type": "json_object"}`).
    regex: the whole output matches this regular expression (Rust `regex` syntax, with `\\d`,
        `\\w` and `\\s` meaning ASCII digits, word characters and spaces, as in JSON Schema).
    choice: the output is exactly one of these strings.
    grammar: a context-free grammar, in GBNF (llama.cpp's, `root ::= ...`) or Lark syntax.
    whitespace_flexible: JSON may put any whitespace between tokens; by default it is written
        as `json.dumps` does (`{"a": 1, "b": [2, 3]}`), which keeps small models from
        rambling in newlines.

    The output ends when the constraint is complete (finish_reason "stop"), even before
    min_tokens and with ignore_eos (nothing could follow); or by the usual limits: max_tokens
    or a stop string cut it wherever they fall, as in vLLM. If the grammar engine gives up (one
    of its resource limits on a pathological grammar), the output ends with "abort".
    """

    json: Any = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    whitespace_flexible: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"guided decoding needs exactly one of {', '.join(KINDS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if self.json is not None:
            object.__setattr__(self, "json", _schema_of(self.json))
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"guided regex={self.regex!r} is invalid; give a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(
                isinstance(c, str) and c for c in self.choice
            ):
                raise ValueError(
                    f"guided choice={self.choice!r} is invalid; give a list of non-empty strings"
                )
            if not self.choice:
                raise ValueError("guided choice is empty; give at least one string")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.grammar is not None and (
            not isinstance(self.grammar, str) or not self.grammar.strip()
        ):
            raise ValueError(f"guided grammar={self.grammar!r} is invalid; give GBNF or Lark text")
        if not isinstance(self.json_object, bool) or not isinstance(self.whitespace_flexible, bool):
            raise ValueError("guided json_object and whitespace_flexible must be True or False")

    @classmethod
    def from_value(cls, value: GuidedDecoding | dict[str, Any]) -> GuidedDecoding:
        """From itself or a dict of its fields (`{"json": schema}`, `{"choice": [...]}`)."""
        if isinstance(value, GuidedDecoding):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"guided={value!r} is invalid; give GuidedDecoding(...) or a dict with one of "
                f"{', '.join(KINDS)}"
            )
        unknown = sorted(set(value) - {*KINDS, "whitespace_flexible"})
        if unknown:
            raise ValueError(
                f"guided has unknown keys {unknown}; accepted: {', '.join(KINDS)}, "
                "whitespace_flexible"
            )
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """A canonical text of the constraint: compiled grammars are cached under it."""
        value = getattr(self, self.kind)
        text = json.dumps(value, sort_keys=True) if self.kind in ("json", "choice") else value
        return f"{self.kind}:{self.whitespace_flexible}:{text}"
