"""Speculative decoding on the tiny model: greedy and seeded outputs equal those without
speculation (batched, stop strings, penalties, logprobs, n > 1, a grammar, prefix caching,
int8 KV), rejected guesses' blocks go back to the pool, the kept tokens follow the target's
distribution (chi-square, a proposer that guesses badly), plus the n-gram lookup and the
config's errors."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from scipy import stats

from lamina import LLM, SamplingParams
from lamina.engine.sequence import Sequence
from lamina.spec.config import SpeculativeConfig
from lamina.spec.ngram import lookup
from lamina.spec.proposer import Proposer
from lamina.spec.speculator import register_proposer
from tests.helpers import JSON_SCHEMAS

# 1-grams: the random model makes few longer repeats, and the tests want guesses verified
NGRAM = {"num_speculative_tokens": 4, "prompt_lookup_min": 1, "disable_by_batch_size": None}
# repetitive prompts: the random model's output and its prompt give n-gram hits
PROMPTS = [
    {"prompt_token_ids": [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]},
    {"prompt_token_ids": [40, 41, 42, 40, 41, 42, 40]},
    {"prompt_token_ids": list(range(60, 90)) * 2},
    {"prompt_token_ids": [100, 101, 102, 103]},
]


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory("llama_gqa")[0]


@pytest.fixture(scope="module")
def plain(folder):
    return LLM(str(folder), dtype="float32")


@pytest.fixture(scope="module")
def spec(folder):
    return LLM(str(folder), dtype="float32", speculative_config=NGRAM)


def tokens(llm: LLM, prompts, params) -> list[list[list[int]]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


# ---- the pieces --------------------------------------------------------------------------
def test_ngram_lookup_continues_the_latest_earlier_occurrence():
    t = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3])
    assert lookup(t, 2, n_max=3, n_min=1) == [7, 8]  # the latest [1, 2, 3] before the tail
    assert lookup(t, 5, n_max=3, n_min=1) == [7, 8, 1, 2, 3]
    assert lookup(np.array([4, 5, 6]), 3, n_max=3, n_min=1) == []
    assert lookup(np.array([4, 5, 4]), 3, n_max=3, n_min=1) == [5, 4]  # 1-gram [4]
    assert lookup(np.array([4, 5, 4]), 3, n_max=3, n_min=2) == []


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="num_speculative_tokens=0 is invalid"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match=r"unknown keys \['k'\]"):
        SpeculativeConfig.from_value({"k": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        SpeculativeConfig.from_value("{k")
    with pytest.raises(ValueError, match="prompt_lookup_min=3 is larger"):
        SpeculativeConfig(prompt_lookup_min=3, prompt_lookup_max=2)


def test_unknown_method_and_retention_policies_are_refused(folder):
    with pytest.raises(
        ValueError, match="method='eagle' is not a proposer; accepted: medusa, ngram"
    ):
        LLM(str(folder), speculative_config={"method": "eagle"})
    with pytest.raises(ValueError, match="needs the dense KV cache"):
        LLM(str(folder), speculative_config=NGRAM, sliding_window=64, attention_sinks=4)


# ---- outputs equal those without speculation ----------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0, "max_tokens": 40, "ignore_eos": True},
        {"temperature": 0, "max_tokens": 40, "ignore_eos": True, "repetition_penalty": 1.3},
        {"temperature": 1.0, "seed": 3, "max_tokens": 40, "ignore_eos": True, "n": 2},
        {
            "temperature": 0.8,
            "top_k": 20,
            "seed": 5,
            "max_tokens": 30,
            "ignore_eos": True,
            "logprobs": 2,
            "presence_penalty": 0.5,
        },
    ],
)
def test_outputs_equal_those_without_speculation(plain, spec, params):
    """(Guesses are kept often in greedy runs, where the random model loops, and seldom under
    penalties and sampling: both paths are covered.)"""
    before = spec.engine.stats.spec.num_drafts
    want = plain.generate(PROMPTS, SamplingParams(**params), use_tqdm=False)
    got = spec.generate(PROMPTS, SamplingParams(**params), use_tqdm=False)
    for w, g in zip(want, got):
        for cw, cg in zip(w.outputs, g.outputs):
            assert cg.token_ids == cw.token_ids
            assert cg.text == cw.text
            if cw.logprobs is not None:
                assert cg.logprobs is not None
                assert [set(e) for e in cg.logprobs] == [set(e) for e in cw.logprobs]
                for ew, eg in zip(cw.logprobs, cg.logprobs):
                    for t in ew:
                        assert eg[t].logprob == pytest.approx(ew[t].logprob, abs=1e-4)
    assert spec.engine.stats.spec.num_drafts > before  # it did speculate
    spec.engine.block_manager.check_all_free()


def test_stop_strings_max_tokens_and_a_grammar(plain, spec):
    text = (
        plain.generate(
            PROMPTS[:1],
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .text
    )
    stop = text[10:13]
    cases = [
        SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        SamplingParams(
            temperature=0.7, seed=1, max_tokens=150, guided={"json": JSON_SCHEMAS["nested"]}
        ),
    ]
    for params in cases:
        want = plain.generate(PROMPTS, params, use_tqdm=False)
        got = spec.generate(PROMPTS, params, use_tqdm=False)
        assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in got] == [
            (o.outputs[0].text, o.outputs[0].finish_reason) for o in want
        ]
        assert all(len(o.outputs[0].token_ids) <= (params.max_tokens or 0) for o in got)


@pytest.mark.parametrize("kw", [{"kv_cache_dtype": "int8"}, {"enable_prefix_caching": False}])
def test_int8_cache_and_no_prefix_caching(folder, kw):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = tokens(LLM(str(folder), dtype="float32", **kw), PROMPTS, params)
    got = tokens(LLM(str(folder), dtype="float32", speculative_config=NGRAM, **kw), PROMPTS, params)
    assert got == want


def test_rejected_guesses_give_their_blocks_back(spec):
    """After every step each running sequence holds just the blocks its tokens need (k = 4
    guesses past a block boundary would otherwise keep a block)."""
    engine = spec.engine
    bm = engine.block_manager
    for i, p in enumerate(PROMPTS):
        engine.add_request(
            f"b{i}",
            p["prompt_token_ids"],
            SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
        )
    verified = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            assert not seq.spec_tokens
            # the computed tokens' blocks, at most one more for the newest token: none kept
            # for rejected guesses
            held = len(seq.block_table)
            assert bm.blocks_needed(seq.num_tokens - 1) <= held <= bm.blocks_needed(seq.num_tokens)
            assert seq.num_computed_tokens == seq.num_tokens - 1 or seq.in_prefill
        verified = engine.stats.spec.num_drafts
    assert verified > 0
    bm.check_all_free()


# ---- the kept tokens follow the target's distribution --------------------------------------
class _GuessRunnerUp(Proposer):
    """Guesses the tokens the test sets, at every step (right only sometimes)."""

    name = "fixed-guess"
    guess: ClassVar[list[int]] = []

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        return [list(self.guess[:k]) for k in num_tokens]


def _chi_square_p(samples: list[int], logits: torch.Tensor, k: int = 8) -> float:
    """p-value of `samples` under softmax of the top-k of `logits` (what top_k=k samples)."""
    top = logits.topk(k)
    probs = top.values.double().softmax(-1).numpy()
    probs /= probs.sum()
    index = {t: i for i, t in enumerate(top.indices.tolist())}
    assert all(t in index for t in samples)
    observed = np.bincount([index[t] for t in samples], minlength=k)
    return float(stats.chisquare(observed, probs * len(samples)).pvalue)


def test_kept_tokens_follow_the_target_distribution(folder, plain):
    """Many seeded draws of 3 tokens; at the one speculative step the proposer guesses g, the
    likeliest token after (prompt, a). Given a first token a: the second token follows the
    target's distribution (whether the guess was kept or not), and given a then g (kept), so
    does the third, which comes from the guess's own row of the verifying pass."""
    register_proposer("fixed-guess", lambda c, m: _GuessRunnerUp())
    prompt = [11, 12, 13, 14, 15]
    a = int(plain.engine.prompt_logits(prompt)[-1].argmax())
    after_a = plain.engine.prompt_logits([*prompt, a])[-1]
    g = int(after_a.argmax())
    after_ag = plain.engine.prompt_logits([*prompt, a, g])[-1]
    _GuessRunnerUp.guess = [g]
    llm = LLM(
        str(folder),
        dtype="float32",
        speculative_config={
            "method": "fixed-guess",
            "num_speculative_tokens": 1,
            "disable_by_batch_size": None,
        },
    )
    params = [
        SamplingParams(temperature=1.0, top_k=8, seed=s, max_tokens=3, ignore_eos=True)
        for s in range(2000)
    ]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(params), params, use_tqdm=False)
    ids = [o.outputs[0].token_ids for o in outs]
    second = [t[1] for t in ids if t[0] == a]
    third = [t[2] for t in ids if t[0] == a and t[1] == g]
    assert len(second) > 300
    assert len(third) > 100
    assert llm.engine.stats.spec.num_accepted_tokens == len(third)  # each kept guess is one
    assert _chi_square_p(second, after_a) > 1e-3
    assert _chi_square_p(third, after_ag) > 1e-3


# ---- who speculates under load -----------------------------------------------------------
class _Always(Proposer):
    name = "always"

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        return [[7] * k for k in num_tokens]


def _decoding(n: int) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=50)) for i in range(n)]
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    return seqs


def test_under_load_only_sequences_whose_guesses_are_kept_speculate():
    from lamina.spec.speculator import PROBE_EVERY, Speculator

    register_proposer("always", lambda c, m: _Always())
    config = SpeculativeConfig(
        method="always", num_speculative_tokens=3, disable_by_batch_size=2, min_acceptance=0.6
    )
    spec = Speculator(config, 1000, model=None)
    a, b, c = seqs = _decoding(3)
    spec.propose(seqs)
    assert all(s.spec_tokens == [7, 7, 7] for s in seqs)  # all tried once (optimistic start)
    for _ in range(2):  # a's guesses kept, b's and c's not
        a.spec_result, b.spec_result, c.spec_result = (3, 3), (3, 0), (3, 0)
        spec.propose(seqs)
    assert (a.spec_tokens, b.spec_tokens, c.spec_tokens) == ([7, 7, 7], [], [])
    for _ in range(PROBE_EVERY - 1):
        a.spec_result = (3, 3)
        spec.propose(seqs)
    assert b.spec_tokens == [7, 7, 7]  # retried after PROBE_EVERY idle steps
    spec.propose(seqs[:2])  # at most disable_by_batch_size decoding: everyone speculates
    assert b.spec_tokens == [7, 7, 7]
    strict = Speculator(SpeculativeConfig(method="always", disable_by_batch_size=2), 1000, None)
    strict.propose(seqs)
    assert all(not s.spec_tokens for s in seqs)
    with pytest.raises(ValueError, match=r"min_acceptance=1\.5 is invalid"):
        SpeculativeConfig(min_acceptance=1.5)
