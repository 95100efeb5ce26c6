"""vLLM's API where users meet it first, on the tiny model: LLM(seed, tokenizer, enforce_eager,
gpu_memory_utilization), SamplingParams(include_stop_str_in_output, bad_words,
allowed_token_ids, truncate_prompt_tokens), RequestOutput.metrics, and per-sample seed
streams that do not overlap across requests."""

from __future__ import annotations

import json
import math
import time

import pytest

from lamina import LLM, SamplingParams
from tests.helpers import write_byte_tokenizer

HOT = {"temperature": 1.0, "max_tokens": 12, "ignore_eos": True}
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [40, 41, 42]}]


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory("llama_gqa")[0]


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32")


def gen(llm: LLM, prompts, **kw):
    return llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)


def token_lists(outs) -> list[list[list[int]]]:
    return [[o.token_ids for o in out.outputs] for out in outs]


def greedy_ids(llm: LLM, prompt, n: int = 24) -> list[int]:
    out = gen(llm, prompt, temperature=0, max_tokens=n, ignore_eos=True)[0]
    return out.outputs[0].token_ids


# ---- seeds -------------------------------------------------------------------------------
def test_sample_streams_do_not_overlap_across_requests(llm):
    """With seed + index, sample 1 of seed=1 was sample 0 of seed=2, token for token."""
    a = gen(llm, PROMPTS[0], n=2, seed=1, **HOT)[0]
    b = gen(llm, PROMPTS[0], n=1, seed=2, **HOT)[0]
    assert a.outputs[1].token_ids != b.outputs[0].token_ids
    c = gen(llm, PROMPTS[0], n=3, seed=1, **HOT)[0]  # still reproducible, sample by sample
    assert [o.token_ids for o in c.outputs[:2]] == [o.token_ids for o in a.outputs]


def test_engine_seed_makes_reruns_identical(folder):
    def script(seed):
        llm = LLM(str(folder), dtype="float32", seed=seed)
        first = gen(llm, PROMPTS, n=2, **HOT)
        second = gen(llm, PROMPTS, n=2, **HOT)  # later requests: later seeds
        return token_lists(first), token_lists(second)

    one, two, other = script(0), script(0), script(1)
    assert one == two
    assert one != other
    assert one[0] != one[1]  # a request's seed follows its arrival number
    assert one[0][0] != one[0][1]  # and two prompts of one call differ


def test_request_seed_wins_over_engine_seed(folder, llm):
    seeded = LLM(str(folder), dtype="float32", seed=123)
    assert token_lists(gen(seeded, PROMPTS, seed=9, **HOT)) == token_lists(
        gen(llm, PROMPTS, seed=9, **HOT)
    )


def test_without_any_seed_samples_differ(llm):
    assert token_lists(gen(llm, PROMPTS[0], n=2, **HOT)) != token_lists(
        gen(llm, PROMPTS[0], n=2, **HOT)
    )


def test_engine_seed_does_not_depend_on_batch(folder):
    """A request's derived seed is fixed at arrival: the same outputs whether its neighbours
    ran with it in one batch or it ran alone (max_num_seqs=1)."""
    batched = LLM(str(folder), dtype="float32", seed=5)
    alone = LLM(str(folder), dtype="float32", seed=5, max_num_seqs=1)
    assert token_lists(gen(batched, PROMPTS, **HOT)) == token_lists(gen(alone, PROMPTS, **HOT))


# ---- engine settings ---------------------------------------------------------------------
def test_vllm_engine_keywords_are_accepted(folder, llm):
    twin = LLM(str(folder), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.9)
    assert greedy_ids(twin, PROMPTS[0]) == greedy_ids(llm, PROMPTS[0])
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization=1.5 .*kv_cache_bytes"):
        LLM(str(folder), gpu_memory_utilization=1.5)


def test_tokenizer_from_another_folder(folder, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    write_byte_tokenizer(tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "OTHER {% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(str(folder), dtype="float32", tokenizer=str(tok))
    assert llm.get_tokenizer().chat_template.startswith("OTHER")
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2))[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("OTHER hi")


def test_tokenizer_errors(folder, tmp_path):
    with pytest.raises(ValueError, match=r"^tokenizer=.*neither"):
        LLM(str(folder), tokenizer=str(tmp_path / "missing"))
    big = tmp_path / "big"
    big.mkdir()
    write_byte_tokenizer(big, vocab_size=259)  # 259 ids for a 256-row model
    with pytest.raises(ValueError, match=r"^tokenizer=.*259 ids"):
        LLM(str(folder), tokenizer=str(big))


# ---- stop strings ------------------------------------------------------------------------
def test_include_stop_str_in_output(llm):
    base = gen(llm, PROMPTS[1], temperature=0, max_tokens=24, ignore_eos=True)[0].outputs[0]
    text = base.text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text.find(text[i : i + 2]) == i)
    at = text.find(stop)
    cut = gen(llm, PROMPTS[1], temperature=0, max_tokens=24, ignore_eos=True, stop=stop)[0]
    kept = gen(
        llm,
        PROMPTS[1],
        temperature=0,
        max_tokens=24,
        ignore_eos=True,
        stop=stop,
        include_stop_str_in_output=True,
    )[0]
    assert cut.outputs[0].text == text[:at]
    assert kept.outputs[0].text == text[: at + len(stop)]
    assert kept.outputs[0].stop_reason == stop
    assert kept.outputs[0].finish_reason == "stop"


def test_include_stop_token_text(llm):
    ids = greedy_ids(llm, PROMPTS[1])
    k = next(i for i in range(4, len(ids)) if ids.index(ids[i]) == i and ids[i] > 2)
    kw = {"temperature": 0, "max_tokens": 24, "stop_token_ids": [ids[k]]}
    cut = gen(llm, PROMPTS[1], **kw)[0].outputs[0]
    kept = gen(llm, PROMPTS[1], include_stop_str_in_output=True, **kw)[0].outputs[0]
    assert cut.token_ids == kept.token_ids == ids[: k + 1]
    tok = llm.get_tokenizer()
    assert cut.text == tok.decode(ids[:k])
    assert kept.text == tok.decode(ids[: k + 1])


# ---- logits steering ---------------------------------------------------------------------
def test_allowed_token_ids(llm):
    allowed = [70, 71, 72, 73]
    outs = gen(llm, PROMPTS, n=3, seed=4, allowed_token_ids=allowed, **HOT)
    for out in outs:
        for o in out.outputs:
            assert set(o.token_ids) <= set(allowed)
    with pytest.raises(ValueError, match=r"^allowed_token_ids=\[300\]"):
        gen(llm, PROMPTS[0], allowed_token_ids=[5, 300])
    assert not llm.engine.has_unfinished_requests()


def test_bad_words(llm):
    ids = greedy_ids(llm, PROMPTS[1])
    tok = llm.get_tokenizer()
    # a two-token word the model writes greedily (printable, and tokenized back the same)
    i = next(
        i
        for i in range(len(ids) - 1)
        if tok.encode(tok.decode(ids[i : i + 2]), add_special_tokens=False) == ids[i : i + 2]
        and tok.decode(ids[i : i + 2]).strip() == tok.decode(ids[i : i + 2])
    )
    word = tok.decode(ids[i : i + 2])
    out = gen(llm, PROMPTS[1], temperature=0, max_tokens=24, ignore_eos=True, bad_words=[word])
    got = out[0].outputs[0].token_ids
    assert got[: i + 1] == ids[: i + 1]  # unchanged until the word's last token
    assert got[i + 1] != ids[i + 1]
    assert all(got[j : j + 2] != ids[i : i + 2] for j in range(len(got) - 1))
    # a 1-token word: the first greedy token that is tokenized back to itself (a lone byte of a
    # multi-byte character decodes to U+FFFD, which is another token)
    t = next(t for t in ids if tok.encode(tok.decode([t]), add_special_tokens=False) == [t])
    one = gen(llm, PROMPTS[1], bad_words=[tok.decode([t])], **HOT)[0]
    assert t not in one.outputs[0].token_ids


# ---- prompt truncation -------------------------------------------------------------------
def test_truncate_prompt_tokens(llm):
    long = list(range(3, 250)) * 2  # 494 tokens: more than the context (256)
    out = gen(
        llm, {"prompt_token_ids": long}, temperature=0, max_tokens=6, truncate_prompt_tokens=10
    )
    assert out[0].prompt_token_ids == long[-10:]
    assert out[0].outputs[0].token_ids == greedy_ids(llm, {"prompt_token_ids": long[-10:]}, 6)
    text = gen(llm, "hello world", max_tokens=2, truncate_prompt_tokens=3)[0]
    assert text.prompt == "hello world"
    assert text.prompt_token_ids == llm.get_tokenizer().encode("hello world")[-3:]


# ---- metrics -----------------------------------------------------------------------------
def test_request_metrics(llm):
    t0 = time.time()
    outs = gen(llm, PROMPTS, temperature=0, max_tokens=5, ignore_eos=True)
    t1 = time.time()
    for out in outs:
        m = out.metrics
        assert m is not None
        assert t0 - 1 <= m.arrival_time <= t1 + 1  # epoch seconds
        assert m.first_scheduled_time is not None
        assert m.first_token_time is not None
        assert m.finished_time is not None
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time
        assert math.isclose(m.time_in_queue, m.first_scheduled_time - m.arrival_time)
    engine = llm.engine
    engine.add_request("x", [5, 6], SamplingParams(max_tokens=3))
    running = engine.step()[0].metrics
    assert running.finished_time is None
    while engine.has_unfinished_requests():
        engine.step()
