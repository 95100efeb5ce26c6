"""Batch invariance ("auto", the default, turns it on where it can): a request's greedy and
seeded tokens do not depend on what it is batched with, on how its prompt is chunked, or on
preemption (its recomputation prefills tokens that were decoded), in the default dtype too.
Checked on the tiny model in float32 and bfloat16 and, for the truth, on SmolLM2 with 16
concurrent requests."""

from __future__ import annotations

import pytest
import torch

from lamina import LLM, SamplingParams
from lamina.attention.exact import ExactAttentionBackend

pytestmark = pytest.mark.skipif(
    not ExactAttentionBackend.available(torch.device("cpu")),
    reason="the exact attention kernel is not built here",
)

TOPICS = ["the sea", "a cat", "Paris", "rain", "python code", "the moon", "a robot", "history"]
TOPICS += ["music", "coffee", "winter", "a train", "math", "birds", "a castle", "the desert"]


def _params(max_tokens: int) -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=max_tokens)
    return [greedy, seeded]


def _tokens(llm: LLM, prompts: list, params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_invariant(path: str, prompts: list, max_tokens: int, **settings) -> None:
    """Each prompt alone, all of them at once with small prefill chunks, and all at once in a
    cache so small that sequences are preempted and recomputed: the same tokens."""
    alone_llm = LLM(path, **settings)
    assert alone_llm.engine.batch_invariant  # the default turns it on for float weights
    tok = alone_llm.get_tokenizer()
    longest = max(len(tok.encode(p)) for p in prompts) + max_tokens
    settings["max_model_len"] = 16 * -(-longest // 16)
    crowded = LLM(path, batch_invariant="on", max_num_batched_tokens=24, **settings)
    blocks = 3 * settings["max_model_len"] // 16  # three sequences' worth
    starved = LLM(path, num_kv_blocks=blocks, **settings)
    for params in _params(max_tokens):
        alone = [_tokens(alone_llm, [p], params)[0] for p in prompts]
        assert _tokens(crowded, prompts, params) == alone
        assert _tokens(starved, prompts, params) == alone
    assert starved.engine.scheduler.stats.num_preemptions > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_model_tokens_do_not_depend_on_the_batch(tiny_model_factory, dtype):
    folder, _ = tiny_model_factory("llama_gqa")
    prompts = [f"{t} " * (1 + i % 5) for i, t in enumerate(TOPICS[:10])]
    assert_invariant(str(folder), prompts, 24, dtype=dtype)


@pytest.mark.slow
def test_smollm2_16_requests_in_the_default_dtype(smollm2_path):
    prompts = [f"Write a short story about {t}." for t in TOPICS]
    assert_invariant(str(smollm2_path), prompts, 32)


def test_combinations_it_cannot_make_invariant_are_refused(tiny_model_factory):
    folder = str(tiny_model_factory("llama_gqa")[0])
    with pytest.raises(ValueError, match="attention_backend='torch' cannot be combined"):
        LLM(folder, batch_invariant=True, attention_backend="torch")
    with pytest.raises(ValueError, match="batch_invariant needs dense attention"):
        LLM(folder, batch_invariant=True, attention_sinks=4, sliding_window=16)
    with pytest.raises(ValueError, match="batch_invariant needs dense attention"):
        LLM(folder, batch_invariant=True, h2o_heavy=8, h2o_recent=8)


def test_auto_runs_without_it_where_it_cannot_be_on(tiny_model_factory, monkeypatch, caplog):
    folder = str(tiny_model_factory("llama_gqa")[0])
    for settings in (
        {"attention_backend": "torch"},
        {"attention_sinks": 4, "sliding_window": 16},
        {"h2o_heavy": 8, "h2o_recent": 8},
        {"batch_invariant": "off"},
        {"batch_invariant": False},
    ):
        engine = LLM(folder, **settings).engine
        assert not engine.batch_invariant, settings
        assert engine.runner.backend.name != "exact", settings
        assert engine.loaded.model.min_rows == 1
    monkeypatch.setattr(
        ExactAttentionBackend, "unavailable_reason", classmethod(lambda cls, d: "no compiler")
    )
    with caplog.at_level("INFO", logger="lamina.engine.batch_invariance"):
        assert not LLM(folder).engine.batch_invariant
    assert "batch invariance is off" in caplog.text
    assert "no compiler" in caplog.text
    with pytest.raises(ValueError, match="not available on cpu: no compiler"):
        LLM(folder, batch_invariant="on")
