"""The sampler against hand-made logits, transformers' logits processors, OpenAI's formulas and
statistics."""

from __future__ import annotations

import math

import pytest
import torch

from lamina import LLM, BeamSearchParams, SamplingParams
from lamina.engine.logits_processors import apply_penalties
from lamina.engine.sampler import Sampler, top_k_top_p_min_p
from lamina.engine.sequence import Sequence


def seq(params: SamplingParams, prompt=(1, 2, 3), output=()) -> Sequence:
    s = Sequence("r", list(prompt), params)
    for t in output:
        s.append_token(t)
    return s


def kept(logits: list[float], top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    out = top_k_top_p_min_p(
        torch.tensor([logits]), torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p])
    )
    return set(torch.nonzero(out[0] > float("-inf")).flatten().tolist())


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log().tolist()
    assert kept(logits, top_p=0.5) == {0}
    assert kept(logits, top_p=0.6) == {0, 1}
    assert kept(logits, top_p=0.69) == {0, 1}  # 0.5 + 0.2 reaches 0.69
    assert kept(logits, top_p=0.71) == {0, 1, 2}
    assert kept(logits, top_p=0.96) == {0, 1, 2, 3, 4}
    assert kept(logits, top_p=0.01) == {0}
    assert kept(logits, top_k=2, top_p=0.9) == {0, 1}  # top-p renormalises after top-k


def test_min_p_keeps_tokens_above_fraction_of_top():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.08, 0.02])
    logits = probs.log().tolist()
    assert kept(logits, min_p=0.49) == {0, 1, 2}  # threshold 0.196
    assert kept(logits, min_p=0.51) == {0, 1}  # threshold 0.204
    assert kept(logits, min_p=0.19) == {0, 1, 2, 3}  # threshold 0.076
    assert kept(logits, min_p=0.21) == {0, 1, 2}  # threshold 0.084
    assert kept(logits, min_p=1.0) == {0}
    assert kept(logits, min_p=0.0) == {0, 1, 2, 3, 4}


def test_penalties_equal_transformers_and_openai():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(1, vocab) * 3
    prompt, output = [3, 7, 7, 20], [7, 41, 41, 41, 5]
    p = SamplingParams(repetition_penalty=1.3)
    ours = apply_penalties(logits.clone(), [seq(p, prompt, output)], vocab)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, ref)
    p = SamplingParams(frequency_penalty=0.7, presence_penalty=0.4)
    ours = apply_penalties(logits.clone(), [seq(p, prompt, output)], vocab)
    expected = logits.clone()
    for tok in set(output):  # OpenAI: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
        expected[0, tok] -= output.count(tok) * 0.7 + 0.4
    torch.testing.assert_close(ours, expected)


def test_top_k_1_and_tiny_temperature_equal_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 100) * 2
    greedy = [seq(SamplingParams(temperature=0)) for _ in range(8)]
    k1 = [seq(SamplingParams(temperature=1.0, top_k=1, seed=i)) for i in range(8)]
    cold = [seq(SamplingParams(temperature=1e-4, seed=i)) for i in range(8)]
    sampler = Sampler()
    g = [r.token for r in sampler(logits, greedy)]
    assert [r.token for r in sampler(logits, k1)] == g
    assert [r.token for r in sampler(logits, cold)] == g
    assert g == logits.argmax(-1).tolist()


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 5.0  # token 2 is "EOS"
    sampler = Sampler(eos_token_ids=[2])
    biased = seq(SamplingParams(temperature=0, logit_bias={7: 10.0}))
    assert sampler(logits, [biased])[0].token == 7
    blocked = seq(SamplingParams(temperature=0, min_tokens=2), output=[4])
    assert sampler(logits, [blocked])[0].token != 2
    free = seq(SamplingParams(temperature=0, min_tokens=2), output=[4, 4])
    assert sampler(logits, [free])[0].token == 2


@pytest.fixture(scope="module")
def tiny_logits(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32")
    return llm, llm.engine.prompt_logits([5, 9, 17, 3])[-1]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_sample_distribution_matches_softmax(tiny_logits, temperature):
    """20k seeded draws from the tiny model's next-token distribution: chi-square test."""
    scipy_stats = pytest.importorskip("scipy.stats")
    _, logits = tiny_logits
    n = 20_000
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(n)]
    tokens = Sampler()(logits.expand(n, -1), [seq(p) for p in params])
    counts = torch.bincount(torch.tensor([r.token for r in tokens]), minlength=logits.numel())
    expected = (logits / temperature).softmax(-1) * n
    big = expected >= 5  # pool rare tokens into one bin
    obs = torch.cat([counts[big].double(), counts[~big].sum(0, keepdim=True).double()])
    exp = torch.cat([expected[big].double(), expected[~big].sum(0, keepdim=True).double()])
    _, p_value = scipy_stats.chisquare(
        obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()
    )
    assert p_value > 1e-3


def test_same_seed_alone_and_in_a_busy_batch(tiny_logits):
    llm, _ = tiny_logits
    target = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": [5, 6, 7]}, target, use_tqdm=False)[0]
    others = [
        SamplingParams(temperature=1.2, max_tokens=n, ignore_eos=True, top_k=20)
        for n in (5, 40, 13)
    ]
    busy = llm.generate(
        [{"prompt_token_ids": p} for p in ([9, 9], [5, 6, 7], [1] * 30, [4])],
        [others[0], target, others[1], others[2]],
        use_tqdm=False,
    )
    assert busy[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_logprobs_shape_like_vllm(tiny_logits):
    llm, _ = tiny_logits
    prompt = [5, 9, 17, 3]
    out = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True),
        use_tqdm=False,
    )[0]
    ref = llm.engine.prompt_logits(prompt + out.outputs[0].token_ids[:-1]).log_softmax(-1)
    comp = out.outputs[0]
    assert len(comp.logprobs) == 4
    cum = 0.0
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry[tok].rank == 1
        assert abs(entry[tok].logprob - row.max().item()) < 1e-4
        assert len(entry) == 3  # greedy: the chosen token is the top-1
        ranks = sorted(e.rank for e in entry.values())
        assert ranks == [1, 2, 3]
        assert all(isinstance(e.decoded_token, str) for e in entry.values())
        cum += entry[tok].logprob
    assert math.isclose(comp.cumulative_logprob, cum, abs_tol=1e-4)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        tok = prompt[pos]
        lp = ref[pos - 1, tok].item()
        assert abs(entry[tok].logprob - lp) < 1e-4
        assert entry[tok].rank == int((ref[pos - 1] > lp).sum()) + 1
        assert len(entry) in (2, 3)


@pytest.mark.slow
def test_beam_search_equals_transformers_num_beams_4(smollm2_llm, hf_smollm2):
    tok, model = hf_smollm2
    prompts = [
        "The capital of France is",
        "def add(a, b):",
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
    ]
    for prompt in prompts:
        ids = tok.encode(prompt)
        ours = smollm2_llm.beam_search(
            {"prompt_token_ids": ids}, BeamSearchParams(beam_width=4, max_tokens=20)
        )[0]
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([ids]), num_beams=4, do_sample=False, max_new_tokens=20
            )[0, len(ids) :].tolist()
        best = ours.sequences[0].token_ids
        assert best == ref[: len(best)], prompt
        assert all(t == tok.eos_token_id for t in ref[len(best) :])  # only padding after EOS
    smollm2_llm.engine.block_manager.check_all_free()
