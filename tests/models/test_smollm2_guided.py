"""Guided decoding on the real model: every output under each JSON schema parses and validates,
greedy and sampled, batched; a float with bounds; regex, choice and grammar outputs match;
greedy output that a constraint allows anyway is unchanged by it."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lamina import SamplingParams
from tests.helpers import JSON_SCHEMAS

pytestmark = pytest.mark.slow

ASKS = [
    "Describe a person as JSON.",
    "Give me a JSON object for a product in a shop.",
    "Write some JSON about a city.",
    "Return JSON, please.",
]
PRICE = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "maxLength": 20},
        "price": {"type": "number", "minimum": 0.5, "maximum": 99.5},
        "currency": {"enum": ["EUR", "USD"]},
    },
    "required": ["item", "price", "currency"],
    "additionalProperties": False,
}


def chat(llm, asks, **kw):
    convs = [[{"role": "user", "content": a}] for a in asks]
    return llm.chat(convs, SamplingParams(**kw), use_tqdm=False)


@pytest.mark.parametrize("name", [*sorted(JSON_SCHEMAS), "price"])
def test_every_output_validates(smollm2_llm, name):
    schema = PRICE if name == "price" else JSON_SCHEMAS[name]
    guided = {"json": schema}
    outs = chat(smollm2_llm, ASKS, temperature=0, max_tokens=200, guided=guided)
    outs += chat(smollm2_llm, ASKS, temperature=0.9, n=2, seed=11, max_tokens=200, guided=guided)
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)


def test_regex_choice_and_grammar(smollm2_llm):
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    for o in chat(
        smollm2_llm,
        ["What is your phone number?"] * 2,
        temperature=0.8,
        seed=2,
        max_tokens=30,
        guided={"regex": phone},
    ):
        assert re.fullmatch(phone, o.outputs[0].text)
    verdicts = ["positive", "negative", "neutral"]
    out = chat(
        smollm2_llm,
        ["Is 'I loved this film' positive or negative?"],
        temperature=0,
        max_tokens=10,
        guided={"choice": verdicts},
    )
    assert out[0].outputs[0].text in verdicts
    gbnf = 'root ::= "Answer: " ("yes" | "no") "."'
    out = chat(
        smollm2_llm, ["Is the sky blue?"], temperature=0, max_tokens=10, guided={"grammar": gbnf}
    )
    assert re.fullmatch(r"Answer: (yes|no)\.", out[0].outputs[0].text)


def test_a_constraint_the_model_already_follows_changes_nothing(smollm2_llm):
    """Constrained to the text greedy decoding writes anyway, the output is token for token the
    same: the free choice is allowed at every step, and it is the argmax of all tokens."""
    ask = ["Count from 1 to 5."]
    free = chat(smollm2_llm, ask, temperature=0, max_tokens=12)[0].outputs[0]
    guided = chat(smollm2_llm, ask, temperature=0, max_tokens=12, guided={"choice": [free.text]})[
        0
    ].outputs[0]
    assert guided.text == free.text
    assert guided.token_ids == free.token_ids[: len(guided.token_ids)]
    assert len(guided.token_ids) >= len(free.token_ids) - 1  # (free may end with EOS)
