"""SamplingParams / EngineConfig checks and the sampler's new steering, without a model:
non-finite numbers refused, per-sample seed streams that never overlap, allowed token ids and
bad words."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from lamina.engine.logits_processors import bad_word_bans
from lamina.engine.sampler import Sampler
from lamina.engine.sequence import Sequence, derive_seed, make_generator
from lamina.engine_config import EngineConfig
from lamina.sampling_params import BeamSearchParams, SamplingParams
from tests.helpers import SAMPLING_FLOAT_FIELDS

V = 12
NON_FINITE = [math.nan, math.inf, -math.inf]
FLOAT_FIELDS = SAMPLING_FLOAT_FIELDS


# ---- non-finite numbers ------------------------------------------------------------------
@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_sampling_floats_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"^{name}=") as e:
        SamplingParams(**{name: value})
    assert "finite" in str(e.value) or "in [" in str(e.value) or "in (" in str(e.value)


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_non_finite_logit_bias_is_refused(value):
    with pytest.raises(ValueError, match=r"^logit_bias"):
        SamplingParams(logit_bias={3: value})


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_non_finite_length_penalty_is_refused(value):
    with pytest.raises(ValueError, match=r"^length_penalty="):
        BeamSearchParams(length_penalty=value)


def test_huge_ints_are_not_finite_floats():
    with pytest.raises(ValueError, match=r"^temperature="):
        SamplingParams(temperature=10**400)
    assert SamplingParams(temperature=2).temperature == 2  # plain ints stay accepted


@pytest.mark.parametrize("value", [*NON_FINITE, 0, 1.5, "0.9", True])
def test_gpu_memory_utilization_must_be_a_fraction(value):
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization="):
        EngineConfig(gpu_memory_utilization=value)


# ---- new SamplingParams fields -----------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
        ({"allowed_token_ids": [1.5]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words": ["ok", 3]}, "bad_words"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 2.0}, "truncate_prompt_tokens"),
        ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ],
)
def test_new_fields_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        SamplingParams(**kwargs)


def test_new_fields_defaults_and_normalisation():
    p = SamplingParams(bad_words="hello", allowed_token_ids=(3, 4), truncate_prompt_tokens=5)
    assert p.bad_words == ["hello"]
    assert p.allowed_token_ids == [3, 4]
    d = SamplingParams()
    assert d.bad_words is None
    assert d.allowed_token_ids is None
    assert d.truncate_prompt_tokens is None
    assert d.include_stop_str_in_output is False


# ---- seed streams ------------------------------------------------------------------------
def draws(seed: int | None, index: int, n: int = 16) -> list[float]:
    return torch.empty(n).exponential_(generator=make_generator(seed, index)).tolist()


def test_sample_streams_of_neighbouring_seeds_do_not_overlap():
    """seed + index made sample 1 of seed 1 the same stream as sample 0 of seed 2."""
    assert draws(1, 1) != draws(2, 0)
    streams = {tuple(draws(s, i)) for s in range(-3, 40) for i in range(8)}
    assert len(streams) == 43 * 8


def test_sample_streams_are_reproducible_and_take_any_int():
    assert draws(7, 3) == draws(7, 3)
    for seed in (-1, 2**63, 2**64 + 5, -(2**70)):  # anything Python calls an int
        assert draws(seed, 1) == draws(seed, 1)
    assert draws(None, 0) != draws(None, 0)  # unseeded: OS entropy


def test_derive_seed_is_a_64_bit_hash_of_the_pair():
    seeds = {derive_seed(s, i) for s in range(64) for i in range(64)}
    assert len(seeds) == 64 * 64
    assert all(0 <= x < 2**64 for x in seeds)
    low32 = {x & 0xFFFFFFFF for x in seeds}  # what torch's CPU generator keeps
    assert len(low32) == 64 * 64


def test_forked_sibling_is_not_a_neighbouring_seed():
    """A Sequence's own generator (index 0) and a fork's stream follow derive_seed."""
    a = Sequence("a", [1, 2], SamplingParams(seed=2), index=0)
    b = Sequence("b", [1, 2], SamplingParams(seed=1), index=1)
    assert a.generator is not None
    assert b.generator is not None
    x = torch.empty(16).exponential_(generator=a.generator)
    y = torch.empty(16).exponential_(generator=b.generator)
    assert not torch.equal(x, y)


# ---- allowed token ids and bad words -----------------------------------------------------
def seq(params: SamplingParams, output=(), bad_words_ids=()) -> Sequence:
    s = Sequence("r", [1, 3], params, bad_words_ids=[list(w) for w in bad_words_ids])
    for t in output:
        s.append_token(t)
    return s


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [0.0, 1.0, 5.0])
def test_allowed_token_ids_bound_every_draw(temperature):
    allowed = [4, 7, 9]
    sampler = Sampler(eos_token_ids=[2])
    params = [
        SamplingParams(temperature=temperature, allowed_token_ids=allowed, seed=i)
        for i in range(200)
    ]
    rows = [seq(p) for p in params]
    picked = {r.token for r in sampler(logits(200, 1), rows)}
    assert picked <= set(allowed)
    if temperature >= 1:
        assert picked == set(allowed)


def test_allowed_token_ids_greedy_is_the_best_allowed():
    x = logits(1, 2)
    out = Sampler()(x, [seq(SamplingParams(temperature=0, allowed_token_ids=[0, 5, 6]))])[0]
    assert out.token == max([0, 5, 6], key=lambda t: float(x[0, t]))
    assert out.logprob == pytest.approx(float(x[0].log_softmax(-1)[out.token]))  # model's own


def test_rows_without_restrictions_are_untouched():
    x = logits(2, 3)
    plain = Sampler()(x, [seq(SamplingParams(temperature=0))] * 2)
    mixed = Sampler()(
        x,
        [
            seq(SamplingParams(temperature=0)),
            seq(SamplingParams(temperature=0, allowed_token_ids=[1])),
        ],
    )
    assert mixed[0].token == plain[0].token
    assert mixed[1].token == 1


def test_bad_word_bans_follow_vllm():
    words = [(5,), (6, 7), (8, 9, 10)]
    p = SamplingParams()
    assert bad_word_bans(seq(p, (), words)) == [5]  # one-token word: always
    assert bad_word_bans(seq(p, (1, 6), words)) == [5, 7]
    assert bad_word_bans(seq(p, (6, 1), words)) == [5]
    assert bad_word_bans(seq(p, (8, 9), words)) == [5, 10]
    assert bad_word_bans(seq(p, (9,), words)) == [5]  # needs the whole head
    assert bad_word_bans(seq(p, (1, 2, 3), ())) == []


def test_bad_words_steer_greedy_and_sampling():
    x = torch.zeros(1, V)
    x[0, 7] = 10.0  # 7 is by far the most likely
    words = [(6, 7)]
    after_6 = Sampler()(x, [seq(SamplingParams(temperature=0), (6,), words)])[0]
    elsewhere = Sampler()(x, [seq(SamplingParams(temperature=0), (5,), words)])[0]
    assert after_6.token != 7
    assert elsewhere.token == 7
    hot = [seq(SamplingParams(temperature=1.0, seed=i), (6,), words) for i in range(100)]
    assert all(r.token != 7 for r in Sampler()(x.expand(100, V), hot))


def test_fork_keeps_the_bad_words():
    s = seq(SamplingParams(), (), [(3, 4)])
    assert s.fork(1, []).bad_words_ids == [[3, 4]]


# ---- engine settings ---------------------------------------------------------------------
def test_engine_fields_accept_vllm_spellings():
    c = EngineConfig(seed=0, tokenizer="tok/", enforce_eager=True, gpu_memory_utilization=0.9)
    assert (c.seed, c.tokenizer, c.enforce_eager, c.gpu_memory_utilization) == (
        0,
        "tok/",
        True,
        0.9,
    )
    d = EngineConfig()
    assert (d.seed, d.tokenizer, d.enforce_eager, d.gpu_memory_utilization) == (
        None,
        None,
        False,
        None,
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seed": "1"}, "seed"),
        ({"seed": True}, "seed"),
        ({"tokenizer": 3}, "tokenizer"),
        ({"enforce_eager": "yes"}, "enforce_eager"),
    ],
)
def test_engine_fields_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        EngineConfig(**kwargs)


def test_engine_fields_have_flags():
    p = argparse.ArgumentParser()
    EngineConfig.add_cli_args(p)
    args = p.parse_args(
        ["--seed", "3", "--tokenizer", "t/", "--enforce-eager", "--gpu-memory-utilization", "0.5"]
    )
    assert EngineConfig.from_cli_args(args) == EngineConfig(
        seed=3, tokenizer="t/", enforce_eager=True, gpu_memory_utilization=0.5
    )
