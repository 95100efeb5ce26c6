"""A server whose engine speculates: streamed and whole outputs equal the offline engine's
without speculation, and /metrics reports proposals and kept tokens by position."""

from __future__ import annotations

import httpx
import pytest

from lamina import LLM, SamplingParams
from lamina.server import ServerSettings
from tests.helpers import SERVED_MODEL_NAME as MODEL

PROMPT = list(range(60, 90)) * 2  # the random model copies it: guesses are kept


@pytest.fixture(scope="module")
def spec_server(tiny_folder, live_server_cls):
    llm = LLM(
        str(tiny_folder),
        dtype="float32",
        speculative_config={
            "num_speculative_tokens": 3,
            "prompt_lookup_min": 1,
            "disable_by_batch_size": None,
        },
    )
    srv = live_server_cls(llm.engine, ServerSettings(served_model_name=MODEL)).start()
    yield srv
    srv.stop()


def test_outputs_and_metrics(spec_server, tiny_llm, metric):
    want = (
        tiny_llm.generate(
            {"prompt_token_ids": PROMPT},
            SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .text
    )
    c = spec_server.client()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "temperature": 0}
    whole = c.completions.create(**body, extra_body={"ignore_eos": True})
    assert whole.choices[0].text == want
    parts = c.completions.create(**body, stream=True, extra_body={"ignore_eos": True})
    assert "".join(p.choices[0].text for p in parts) == want
    text = httpx.get(spec_server.base_url + "/metrics", timeout=30).text
    drafts = metric(text, "lamina:spec_decode_num_drafts_total", model_name=MODEL)
    kept = metric(text, "lamina:spec_decode_num_accepted_tokens_total", model_name=MODEL)
    first = metric(
        text, "lamina:spec_decode_num_accepted_tokens_per_pos_total", model_name=MODEL, position="0"
    )
    assert drafts > 0
    assert kept > 0
    verified = metric(
        text, "lamina:spec_decode_num_draft_tokens_per_pos_total", model_name=MODEL, position="0"
    )
    assert 0 < first <= kept
    assert first <= verified <= drafts
    spec_server.assert_all_blocks_free()
