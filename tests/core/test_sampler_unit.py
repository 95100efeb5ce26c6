"""The sampler without a model: random logits over a tiny vocabulary, checked against
independent plain-python / plain-torch references (tests/engine/test_sampler.py has the
hand-made cases and the checks that need a model)."""

from __future__ import annotations

import math

import pytest
import torch

from lamina.engine.sampler import Sampler, top_k_top_p_min_p
from lamina.engine.sequence import Sequence
from lamina.sampling_params import SamplingParams

V = 12  # vocabulary
EOS = 2


def make_seq(params: SamplingParams, prompt=(1, 3, 3, 4), output=(), index: int = 0) -> Sequence:
    s = Sequence("r", list(prompt), params, index=index)
    for t in output:
        s.append_token(t)
    return s


def rand_logits(rows: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


# ---- an independent reference of the filters, in float64 python --------------------------
def ref_kept(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """The documented filters applied in order (min-p, then top-k, then top-p renormalised over
    what is left), one python float at a time."""
    m = max(row)
    exps = [math.exp(x - m) for x in row]
    total = sum(exps)
    probs = [e / total for e in exps]
    alive = [i for i in range(len(row)) if probs[i] >= min_p * max(probs)]
    alive.sort(key=lambda i: -row[i])
    if top_k > 0:
        alive = alive[:top_k]
    mass = sum(probs[i] for i in alive)
    kept, before = [], 0.0
    for i in alive:
        if top_p < 1 and before >= top_p:  # the smallest prefix reaching top_p
            break
        kept.append(i)
        before += probs[i] / mass
    return set(kept)


FILTERS = [
    (0, 1.0, 0.0),
    (1, 1.0, 0.0),
    (3, 1.0, 0.0),
    (0, 0.5, 0.0),
    (0, 0.9, 0.0),
    (0, 1.0, 0.1),
    (0, 1.0, 0.5),
    (5, 0.8, 0.0),
    (4, 1.0, 0.2),
    (0, 0.7, 0.05),
    (6, 0.6, 0.1),
    (V, 0.99, 0.01),
]


def test_filters_equal_the_reference_row_by_row():
    """Every row of a batch carries its own (top_k, top_p, min_p); 20 random batches."""
    n = len(FILTERS)
    top_k = torch.tensor([f[0] for f in FILTERS])
    top_p = torch.tensor([f[1] for f in FILTERS])
    min_p = torch.tensor([f[2] for f in FILTERS])
    sizes = set()
    for seed in range(20):
        logits = rand_logits(n, seed, scale=1.5)
        out = top_k_top_p_min_p(logits, top_k, top_p, min_p)
        assert out.shape == logits.shape
        for r, (k, p, mp) in enumerate(FILTERS):
            kept = set(torch.nonzero(out[r] > float("-inf")).flatten().tolist())
            assert kept == ref_kept(logits[r].tolist(), k, p, mp), (seed, k, p, mp)
            assert kept  # the top token always survives
            assert torch.equal(out[r, sorted(kept)], logits[r, sorted(kept)])  # kept: unchanged
            sizes.add(len(kept))
    assert len(sizes) > 5  # the cases are not all trivial


def test_the_draw_only_picks_filtered_tokens_of_tempered_logits():
    """Temperature comes before min-p / top-k / top-p: 400 draws per row stay in the kept set
    of logits / T and (the sets being small) cover it."""
    logits = rand_logits(1, 7)
    sampler = Sampler()
    for temp, k, p, mp in [(0.5, 0, 0.8, 0.0), (2.0, 0, 0.8, 0.0), (1.5, 4, 1.0, 0.3)]:
        seq = make_seq(SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=mp, seed=3))
        drawn = {r.token for r in sampler(logits.expand(400, -1), [seq] * 400)}
        assert drawn == ref_kept((logits[0] / temp).tolist(), k, p, mp), (temp, k, p, mp)
    cold = ref_kept((logits[0] / 0.5).tolist(), 0, 0.8, 0.0)
    hot = ref_kept((logits[0] / 2.0).tolist(), 0, 0.8, 0.0)
    assert len(cold) < len(hot)  # so the order of temperature and top-p matters here


def test_greedy_is_argmax_and_logprobs_are_the_models():
    logits = rand_logits(6, 1)
    seqs = [make_seq(SamplingParams(temperature=0, logprobs=n)) for n in (None, 0, 1, 3, 5, None)]
    res = Sampler()(logits, seqs)
    logp = torch.log_softmax(logits.double(), -1)
    for i, r in enumerate(res):
        best = max(range(V), key=lambda j: logits[i, j].item())
        assert r.token == best
        assert math.isclose(r.logprob, logp[i, best].item(), abs_tol=1e-5)
        n = seqs[i].sampling_params.logprobs
        if n is None:
            assert r.rank is None
            assert r.top is None
        else:
            assert r.rank == 1
            order = sorted(range(V), key=lambda j: -logits[i, j].item())[:n]
            assert [t for t, _ in r.top] == order
            for t, lp in r.top:
                assert math.isclose(lp, logp[i, t].item(), abs_tol=1e-5)


def test_greedy_ignores_temperature_and_filters_of_other_rows():
    logits = rand_logits(4, 2)
    seqs = [
        make_seq(SamplingParams(temperature=0)),
        make_seq(SamplingParams(temperature=1.3, top_k=2, seed=1)),
        make_seq(SamplingParams(temperature=0, top_p=0.1, min_p=0.9)),  # filters: sampling only
        make_seq(SamplingParams(temperature=0.7, min_p=0.2, seed=2)),
    ]
    res = Sampler()(logits, seqs)
    assert res[0].token == int(logits[0].argmax())
    assert res[2].token == int(logits[2].argmax())
    assert res[1].token in torch.topk(logits[1], 2).indices.tolist()


def ref_steered(logits: torch.Tensor, seqs: list[Sequence], eos: list[int]) -> torch.Tensor:
    """logit_bias, then min_tokens blocking, then repetition (prompt + output), then frequency and
    presence (output only), as sampling_params.SamplingParams documents them."""
    out = logits.clone().double()
    for i, s in enumerate(seqs):
        p = s.sampling_params
        for tok, bias in (p.logit_bias or {}).items():
            out[i, tok] += bias
        if len(s.output_token_ids) < p.min_tokens:
            for tok in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
                out[i, tok] = -math.inf
        for tok in set(s.prompt_token_ids) | set(s.output_token_ids):
            x = out[i, tok].item()
            if p.repetition_penalty != 1.0 and x != -math.inf:
                out[i, tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for tok in set(s.output_token_ids):
            count = s.output_token_ids.count(tok)
            out[i, tok] -= p.frequency_penalty * count + p.presence_penalty
    return out


STEER_CASES = [
    {},
    {"logit_bias": {0: 5.0, 7: -3.5}},
    {"logit_bias": {11: 100.0}},
    {"repetition_penalty": 1.7},
    {"repetition_penalty": 0.6},
    {"frequency_penalty": 0.8, "presence_penalty": -0.4},
    {"frequency_penalty": -1.2},
    {"min_tokens": 4, "stop_token_ids": [9]},
    {"min_tokens": 4, "stop_token_ids": [9], "ignore_eos": True},
    {"min_tokens": 2, "stop_token_ids": [9]},  # already 3 outputs: nothing blocked
    {"logit_bias": {3: 2.0}, "repetition_penalty": 1.3, "presence_penalty": 0.5, "min_tokens": 5},
]


def steer_batch() -> tuple[torch.Tensor, list[Sequence]]:
    seqs = [
        make_seq(SamplingParams(temperature=0, **kw), prompt=(1, 3, 3, 4), output=(5, 3, 5))
        for kw in STEER_CASES
    ]
    return rand_logits(len(seqs), 3), seqs


def test_bias_min_tokens_and_penalties_equal_the_reference():
    logits, seqs = steer_batch()
    ours = Sampler(eos_token_ids=[EOS])._steer(logits, seqs)
    ref = ref_steered(logits, seqs, [EOS])
    assert torch.equal(ours == -math.inf, ref == -math.inf)
    finite = ref != -math.inf
    torch.testing.assert_close(ours.double()[finite], ref[finite], atol=1e-5, rtol=1e-6)
    assert torch.equal(ours[0], logits[0])  # no settings: untouched
    blocked = {i for i in range(len(seqs)) if bool((ref[i] == -math.inf).any())}
    assert blocked == {7, 8, 10}
    assert ours[7, EOS] == -math.inf
    assert ours[8, EOS] != -math.inf
    assert not torch.equal(ours[3], logits[3])
    assert not torch.equal(ours[5], logits[5])


def test_steering_changes_greedy_but_not_the_reported_logprob():
    logits, seqs = steer_batch()
    res = Sampler(eos_token_ids=[EOS])(logits, seqs)
    ref = ref_steered(logits, seqs, [EOS])
    logp = torch.log_softmax(logits.double(), -1)
    assert [r.token for r in res] == ref.argmax(-1).tolist()
    assert res[2].token == 11  # a +100 bias wins
    for i, r in enumerate(res):
        assert math.isclose(r.logprob, logp[i, r.token].item(), abs_tol=1e-5)


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 9.0
    logits[0, 6] = 8.0
    logits[0, 10] = 7.0
    sampler = Sampler(eos_token_ids=[EOS])
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[6])
    got = [sampler(logits, [make_seq(params, output=[4] * n)])[0].token for n in range(5)]
    assert got == [10, 10, 10, EOS, EOS]


def test_seeded_draws_do_not_depend_on_the_batch():
    """A seeded row gets the same tokens over 30 steps alone or among other rows (seeded,
    unseeded, greedy, filtered) in varying positions; its n > 1 siblings get other streams."""
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    sampler = Sampler()
    alone, busy, sibling = make_seq(params), make_seq(params), make_seq(params, index=1)
    others = [
        make_seq(SamplingParams(temperature=1.2)),
        make_seq(SamplingParams(temperature=0.5, top_k=3, seed=1234)),  # same seed, other params
        make_seq(SamplingParams(temperature=0)),
        make_seq(SamplingParams(temperature=1.0, min_p=0.3, seed=99)),
    ]
    a, b, c = [], [], []
    for step in range(30):
        logits = rand_logits(1, 100 + step, scale=0.5)  # flat: many likely tokens
        a.append(sampler(logits, [alone])[0].token)
        batch = [*others[: step % 5], busy, sibling, *others[step % 5 :]]
        res = sampler(logits.expand(len(batch), -1).contiguous(), batch)
        b.append(res[batch.index(busy)].token)
        c.append(res[batch.index(sibling)].token)
    assert a == b
    assert a != c
    assert len(set(a)) > 3


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.8, 0, 1.0), (1.0, 5, 0.9)]
)
def test_draws_follow_the_softmax(temperature, top_k, top_p):
    """6000 draws from one seeded stream against softmax(logits / T) renormalised over the kept
    tokens: chi-square. The same counts must reject the untempered distribution."""
    stats = pytest.importorskip("scipy.stats")
    n = 6000
    logits = rand_logits(1, 11, scale=1.0)
    seq = make_seq(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=5))
    tokens = [r.token for r in Sampler()(logits.expand(n, -1), [seq] * n)]
    counts = torch.bincount(torch.tensor(tokens), minlength=V).double()
    kept = sorted(ref_kept((logits[0] / temperature).tolist(), top_k, top_p, 0.0))
    assert counts.sum() == counts[kept].sum()  # nothing outside the kept set
    probs = torch.softmax(logits[0, kept].double() / temperature, -1)
    _, p_value = stats.chisquare(counts[kept].numpy(), (probs * n).numpy())
    assert p_value > 1e-3, p_value
    if temperature != 1.0:
        wrong = torch.softmax(logits[0, kept].double(), -1)
        _, p_wrong = stats.chisquare(counts[kept].numpy(), (wrong * n).numpy())
        assert p_wrong < 1e-6, p_wrong
