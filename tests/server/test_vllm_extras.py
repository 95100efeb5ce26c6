"""vLLM's extra sampling fields reach the engine through the server: each request equals the
offline engine with the same SamplingParams."""

from __future__ import annotations

import pytest

from lamina import SamplingParams
from tests.helpers import SERVED_MODEL_NAME as MODEL

PROMPT = "The capital of France is"


@pytest.mark.parametrize(
    "extra",
    [
        {"allowed_token_ids": [40, 41, 42]},
        {"bad_words": ["the", "a"]},
        {"stop": ["e"], "include_stop_str_in_output": True},
        {"truncate_prompt_tokens": 3},
    ],
)
def test_extra_fields_equal_offline(server, tiny_llm, extra):
    resp = server.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=extra
    )
    want = tiny_llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=8, **extra), use_tqdm=False
    )[0].outputs[0]
    assert resp.choices[0].text == want.text
    assert resp.choices[0].finish_reason == want.finish_reason


def test_truncation_lets_a_long_prompt_in(server, tiny_llm):
    """A prompt longer than the context is refused, unless the request truncates it."""
    limit = tiny_llm.engine.scheduler_config.max_model_len
    long_ids = [5 + i % 200 for i in range(limit + 10)]
    import openai

    client = server.client()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt=long_ids, max_tokens=4, temperature=0)
    resp = client.completions.create(
        model=MODEL,
        prompt=long_ids,
        max_tokens=4,
        temperature=0,
        extra_body={"truncate_prompt_tokens": 16},
    )
    want = tiny_llm.generate(
        {"prompt_token_ids": long_ids[-16:]},
        SamplingParams(temperature=0, max_tokens=4),
        use_tqdm=False,
    )
    assert resp.choices[0].text == want[0].outputs[0].text
    assert resp.usage.prompt_tokens == 16
