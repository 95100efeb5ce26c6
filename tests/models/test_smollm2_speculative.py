"""Speculative decoding on the real model: greedy output with prompt lookup is token for token
the output without speculation, batched, many prompts, with and without stop strings; and on a
copying task many guesses are kept."""

from __future__ import annotations

import pytest

from lamina import SamplingParams
from lamina.engine.llm_engine import LLMEngine
from lamina.spec.config import SpeculativeConfig

pytestmark = pytest.mark.slow

TEXTS = [
    "The committee met on Tuesday to review the budget for the new library wing.",
    "Rain fell all night, and by morning the river had risen over the lower road.",
    "She packed two shirts, a notebook and a map, then locked the door behind her.",
    "Water boils at one hundred degrees Celsius at sea level.",
]
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]


def prompts(tok) -> list[list[int]]:
    asks = [f"Repeat this sentence exactly: {t}" for t in TEXTS] + QUESTIONS
    return [tok.apply_chat_template([{"role": "user", "content": a}], tokenize=True) for a in asks]


def run(engine: LLMEngine, ids: list[list[int]], params: SamplingParams) -> list[list[int]]:
    for i, p in enumerate(ids):
        engine.add_request(f"r{i}", p, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(ids))]


@pytest.fixture(scope="module")
def engines(smollm2_llm):
    """The fixture's engine, and one that speculates over the same weights."""
    e = smollm2_llm.engine
    spec = LLMEngine(
        e.loaded,
        e.cache_config,
        e.scheduler_config,
        speculative_config=SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=None),
    )
    return e, spec


@pytest.mark.parametrize("stop", [None, ["."]])
def test_greedy_equals_no_speculation(smollm2_llm, engines, stop):
    plain, spec = engines
    ids = prompts(smollm2_llm.tokenizer)
    params = SamplingParams(temperature=0, max_tokens=48, stop=stop)
    before = spec.stats.spec.num_accepted_tokens
    assert run(spec, ids, params) == run(plain, ids, params)
    assert spec.stats.spec.num_accepted_tokens > before
    spec.block_manager.check_all_free()


def test_copying_keeps_many_guesses(smollm2_llm, engines):
    _, spec = engines
    ids = prompts(smollm2_llm.tokenizer)[: len(TEXTS)]
    drafts, kept = spec.stats.spec.num_draft_tokens, spec.stats.spec.num_accepted_tokens
    run(spec, ids, SamplingParams(temperature=0, max_tokens=40))
    drafts, kept = (
        spec.stats.spec.num_draft_tokens - drafts,
        spec.stats.spec.num_accepted_tokens - kept,
    )
    assert kept > 10
    assert kept / drafts > 0.25  # 0.39 measured: the 135M model paraphrases as often as it copies


def test_bfloat16_is_exact_with_batch_invariance(smollm2_path):
    """In bf16 a (k + 1)-token verifying pass does not round like k + 1 one-token passes, so a
    near tie can flip; batch_invariant=True makes every row's arithmetic independent of the
    pass, and the outputs identical."""
    from lamina import LLM

    convs = [[{"role": "user", "content": f"Rewrite this text: {t}"}] for t in TEXTS]
    params = SamplingParams(temperature=0, max_tokens=64)
    outs = []
    for spec in (None, {"num_speculative_tokens": 4, "disable_by_batch_size": None}):
        llm = LLM(
            str(smollm2_path),
            dtype="bfloat16",
            max_model_len=512,
            batch_invariant=True,
            speculative_config=spec,
        )
        outs.append([o.outputs[0].token_ids for o in llm.chat(convs, params, use_tqdm=False)])
    assert outs[0] == outs[1]
    assert llm.engine.stats.spec.num_accepted_tokens > 0
