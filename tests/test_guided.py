"""Guided decoding on the tiny random model, where only the grammar keeps the output valid: JSON
schemas (validated with `jsonschema`), regex, choice, GBNF / Lark grammars; greedy, sampling,
n > 1, stop strings, preemption; greedy picks the most likely allowed token; plus the pieces
(spec validation, bitmask unpacking, hard-constraint fallback, compile errors)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from pydantic import BaseModel

from lamina import LLM, GuidedDecoding, SamplingParams
from lamina.engine.llm_engine import LLMEngine
from lamina.engine.logits_processors import (
    LogitsProcessor,
    MinTokens,
    run_processors,
)
from lamina.engine.sequence import Sequence
from lamina.guided.backend import (
    GrammarBackend,
    GrammarMatcher,
    TokenizerInfo,
)
from lamina.guided.processor import unpack_bitmask
from lamina.guided.registry import register_grammar_backend
from tests.helpers import JSON_SCHEMAS as SCHEMAS

PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [40, 41, 42]}]


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    return LLM(str(tiny_model_factory("llama_gqa")[0]), dtype="float32")


def gen(llm: LLM, prompts, **kw):
    return llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)


# ---- the spec ----------------------------------------------------------------------------
def test_spec_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of json, json_object, regex"):
        GuidedDecoding()
    with pytest.raises(ValueError, match="got regex, choice"):
        GuidedDecoding(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="list of non-empty strings"):
        GuidedDecoding(choice="ab")
    with pytest.raises(ValueError, match="not valid JSON"):
        GuidedDecoding(json="{oops")
    with pytest.raises(ValueError, match="unknown keys \\['regexp'\\]"):
        SamplingParams(guided={"regexp": "a"})


def test_spec_from_pydantic_and_canonical_key():
    class Point(BaseModel):
        x: int
        y: int

    spec = GuidedDecoding(json=Point)
    assert spec.json == Point.model_json_schema()
    same = GuidedDecoding(json=json.dumps(dict(reversed(list(spec.json.items())))))
    assert spec.key() == same.key()
    assert SamplingParams(guided={"choice": ["a", "b"]}).guided == GuidedDecoding(choice=("a", "b"))


# ---- the pieces --------------------------------------------------------------------------
def test_unpack_bitmask_matches_llguidance_bit_order():
    words = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32)
    ours = unpack_bitmask(words, 100)
    for r in range(3):
        for t in range(100):
            assert bool(ours[r, t]) == bool((int(words[r, t // 32]) >> (t % 32)) & 1)


class _Only(LogitsProcessor):
    hard = True

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, logits, seqs):
        out = torch.full_like(logits, float("-inf"))
        out[:, self.token] = logits[:, self.token]
        return out


def test_soft_stages_never_empty_a_row_the_hard_ones_allow():
    """A grammar that allows only EOS beats min_tokens, which blocks EOS."""
    seq = Sequence("r", [1, 2], SamplingParams(min_tokens=3))
    logits = torch.randn(1, 10)
    out = run_processors([_Only(2), MinTokens([2])], logits, [seq])
    assert torch.isfinite(out[0, 2])
    assert int(out.argmax()) == 2


def test_compile_errors_name_the_problem(llm):
    with pytest.raises(ValueError, match=r"guided json schema is invalid|does not compile"):
        gen(llm, PROMPTS[0], guided={"json": {"type": "objectx"}})
    with pytest.raises(ValueError, match=r"(?s)regex does not compile.*unclosed group"):
        gen(llm, PROMPTS[0], guided={"regex": "a(b"})
    with pytest.raises(ValueError, match="guided grammar"):
        gen(llm, PROMPTS[0], guided={"grammar": "root ::= missing_rule"})
    assert not llm.engine.has_unfinished_requests()


# ---- outputs on the tiny model -----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(llm, name):
    schema = SCHEMAS[name]
    outs = gen(llm, PROMPTS, temperature=0, max_tokens=200, guided={"json": schema})
    outs += gen(llm, PROMPTS, temperature=1.0, n=3, seed=7, max_tokens=200, guided={"json": schema})
    texts = [c.text for o in outs for c in o.outputs]
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)
    assert len(set(texts)) > 1  # sampling varies within the schema


def test_json_object_regex_choice_and_grammars(llm):
    obj = gen(llm, PROMPTS, temperature=0.8, seed=1, max_tokens=200, guided={"json_object": True})
    for o in obj:  # any object may be longer than max_tokens for a random model
        c = o.outputs[0]
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
    regex = r"\d{3}-[a-z]{2,4}"
    for o in gen(
        llm, PROMPTS, temperature=1.0, n=2, seed=3, max_tokens=40, guided={"regex": regex}
    ):
        for c in o.outputs:
            assert re.fullmatch(regex, c.text), c.text
            assert c.finish_reason == "stop"
    words = ["alpha", "beta", "gamma delta"]
    picked = {
        c.text
        for o in gen(
            llm, PROMPTS * 4, temperature=1.5, seed=0, max_tokens=20, guided={"choice": words}
        )
        for c in o.outputs
    }
    assert picked <= set(words)
    gbnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]?'
    lark = 'start: "<" WORD ">"\nWORD: /[a-z]{1,5}/'
    for grammar, pattern in (
        (gbnf, r"\((?:[1-9][0-9]?)(?:,[1-9][0-9]?)*\)"),
        (lark, r"<[a-z]{1,5}>"),
    ):
        for o in gen(
            llm, PROMPTS, temperature=1.0, seed=5, max_tokens=60, guided={"grammar": grammar}
        ):
            assert re.fullmatch(pattern, o.outputs[0].text), o.outputs[0].text


def test_greedy_picks_the_most_likely_allowed_token(llm):
    """Recompute the logits of every generated position and ask an independent matcher which
    tokens were allowed there: each greedy token is the best of those."""
    schema = SCHEMAS["nested"]
    prompt = PROMPTS[0]["prompt_token_ids"]
    out = gen(llm, PROMPTS[0], temperature=0, max_tokens=200, guided={"json": schema})[0]
    ids = out.outputs[0].token_ids
    logits = llm.engine.prompt_logits(prompt + ids)[len(prompt) - 1 :]
    backend = llm.engine.grammars.backend()
    matcher = backend.matcher(GuidedDecoding(json=schema))
    words = (logits.shape[-1] + 31) // 32
    for step, token in enumerate(ids):
        row = torch.empty(1, words, dtype=torch.int32)
        matcher.fill_mask(row[0])
        allowed = unpack_bitmask(row, logits.shape[-1])[0]
        best = logits[step].masked_fill(~allowed, float("-inf")).max()
        assert allowed[token]
        assert float(logits[step, token]) >= float(best) - 1e-4, step
        assert matcher.consume(token)
    assert matcher.is_finished()


def test_guided_and_plain_requests_share_a_batch(llm):
    plain_alone = gen(llm, PROMPTS[1], temperature=0, max_tokens=12, ignore_eos=True)[0]
    mixed = llm.generate(
        [PROMPTS[0], PROMPTS[1]],
        [
            SamplingParams(temperature=0, max_tokens=200, guided={"json": SCHEMAS["nested"]}),
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        ],
        use_tqdm=False,
    )
    jsonschema.validate(json.loads(mixed[0].outputs[0].text), SCHEMAS["nested"])
    assert mixed[1].outputs[0].token_ids == plain_alone.outputs[0].token_ids


def test_stop_strings_and_max_tokens_still_cut(llm):
    full = gen(llm, PROMPTS[0], temperature=0, max_tokens=200, guided={"json": SCHEMAS["nested"]})
    text = full[0].outputs[0].text
    cut = gen(
        llm,
        PROMPTS[0],
        temperature=0,
        max_tokens=200,
        stop=['"address"'],
        guided={"json": SCHEMAS["nested"]},
    )[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.stop_reason == '"address"'
    assert text.startswith(cut.text)
    short = gen(llm, PROMPTS[0], temperature=0, max_tokens=3, guided={"json": SCHEMAS["nested"]})
    assert short[0].outputs[0].finish_reason == "length"
    assert text.startswith(short[0].outputs[0].text)


def test_preemption_keeps_each_grammar_state(tiny_model_factory, llm):
    """Recomputed sequences keep their matcher: outputs equal those of a roomy engine."""
    folder = tiny_model_factory("llama_gqa")[0]
    tight = LLM(str(folder), dtype="float32", num_kv_blocks=12, max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": list(range(10 + i, 40 + i))} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=120, guided={"json": SCHEMAS["nested"]})
    got = tight.generate(prompts, params, use_tqdm=False)
    want = llm.generate(prompts, params, use_tqdm=False)
    assert tight.engine.stats.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize("ahead", [True, False])
def test_masks_computed_ahead_or_in_the_sampler_give_the_same_tokens(llm, ahead):
    proc = llm.engine.grammars.processor
    default = proc.ahead
    params = {"temperature": 0.7, "seed": 4, "n": 2, "max_tokens": 200}
    want = [
        c.token_ids
        for o in gen(llm, PROMPTS, guided={"json": SCHEMAS["nested"]}, **params)
        for c in o.outputs
    ]
    before_ahead, before_now = proc.masks_ahead, proc.masks_now
    proc.ahead = ahead
    try:
        outs = gen(llm, PROMPTS, guided={"json": SCHEMAS["nested"]}, **params)
    finally:
        proc.ahead = default
    assert [c.token_ids for o in outs for c in o.outputs] == want
    ahead_n, now_n = proc.masks_ahead - before_ahead, proc.masks_now - before_now
    if ahead:
        assert now_n <= 4  # each sample's first token
        assert ahead_n > 10 * now_n
    else:
        assert ahead_n == 0


def test_without_a_tokenizer_guided_is_refused(tiny_model_factory):
    llm = LLM(str(tiny_model_factory("llama_gqa")[0]), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match=r"guided decoding constrains text.*allowed_token_ids"):
        gen(llm, PROMPTS[0], guided={"regex": "a+"})


# ---- the backend seam --------------------------------------------------------------------
class _GivesUp(GrammarMatcher):
    """Allows any token, and fails on the fourth (as a grammar engine hitting a limit)."""

    def __init__(self) -> None:
        self.n = 0

    def consume(self, token: int) -> bool:
        self.n += 1
        return self.n < 4

    def rollback(self, num_tokens: int) -> None:
        self.n -= num_tokens

    def fill_mask(self, row: torch.Tensor) -> None:
        row.fill_(-1)

    def is_finished(self) -> bool:
        return False

    def error(self) -> str | None:
        return "too complex" if self.n >= 4 else None

    def copy(self) -> _GivesUp:
        twin = _GivesUp()
        twin.n = self.n
        return twin


class _GivesUpBackend(GrammarBackend):
    name = "gives-up"

    def __init__(self, info: TokenizerInfo) -> None:
        self.info = info

    def matcher(self, spec: GuidedDecoding) -> GrammarMatcher:
        return _GivesUp()


def test_a_registered_backend_plugs_in_and_a_broken_grammar_aborts(llm):
    register_grammar_backend("gives-up", _GivesUpBackend)
    engine = LLMEngine(llm.engine.loaded, guided_decoding_backend="gives-up")
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=20, guided={"regex": "a+"}))
    while engine.has_unfinished_requests():
        outs = engine.step()
    out = outs[0].outputs[0]
    assert out.finish_reason == "abort"
    assert len(out.token_ids) == 4
    assert isinstance(engine.grammars.backend(), _GivesUpBackend)
    assert engine.grammars.backend().info.vocab_size == llm.engine.model_config.vocab_size
