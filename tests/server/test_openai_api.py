"""The official openai SDK (sync and async) against a live server on the tiny model: every
result equals offline `LLM.generate` / `LLM.chat` with the same settings."""

from __future__ import annotations

import asyncio

import pytest

from lamina import SamplingParams
from tests.helpers import SERVED_MODEL_NAME as MODEL

PROMPTS = ["Hello there", "The capital of France is", "def fib(n):", "1, 2, 3,"]
CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi, who are you?"}]


def offline(llm, prompts, **params):
    outs = llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
    return [o.outputs for o in outs]


def test_models_list(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_completions_equal_offline(server, tiny_llm):
    client = server.client()
    resp = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    want = offline(tiny_llm, PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in resp.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in resp.choices] == [w[0].text for w in want]
    assert [c.finish_reason for c in resp.choices] == [w[0].finish_reason for w in want]
    n_prompt = sum(len(tiny_llm.tokenizer.encode(p)) for p in PROMPTS)
    n_out = sum(len(w[0].token_ids) for w in want)
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.completion_tokens == n_out
    assert resp.usage.total_tokens == n_prompt + n_out
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")


def test_token_id_prompts(server, tiny_llm):
    client = server.client()
    ids = [tiny_llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    want = offline(tiny_llm, ids, max_tokens=8, temperature=0)
    one = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=8, temperature=0)
    assert one.choices[0].text == want[0][0].text
    many = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in many.choices] == [w[0].text for w in want]


def test_chat_equals_offline(server, tiny_llm):
    resp = server.client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, temperature=0
    )
    want = tiny_llm.chat(CHAT, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)
    out = want[0].outputs[0]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == out.text
    assert resp.choices[0].finish_reason == out.finish_reason
    assert resp.usage.prompt_tokens == len(want[0].prompt_token_ids)
    assert resp.usage.completion_tokens == len(out.token_ids)


def test_chat_without_max_tokens_uses_the_rest_of_the_context(server):
    resp = server.client().chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == 256  # the tiny model's max_model_len


def test_stream_completion_with_usage(server, tiny_llm):
    chunks = list(
        server.client().completions.create(
            model=MODEL,
            prompt=PROMPTS[1],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    want = offline(tiny_llm, PROMPTS[1], max_tokens=12, temperature=0)[0][0]
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert text_chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_stream_chat_role_first_then_usage(server, tiny_llm):
    chunks = list(
        server.client().chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    want = tiny_llm.chat(CHAT, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    assert first.content == ""
    body = [c for c in chunks[1:] if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == want[0].outputs[0].text
    assert body[-1].choices[0].finish_reason == want[0].outputs[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(want[0].prompt_token_ids)
    assert chunks[-1].object == "chat.completion.chunk"


def test_stream_without_usage_has_no_usage_chunk(server):
    chunks = list(
        server.client().completions.create(
            model=MODEL, prompt="abc", max_tokens=4, temperature=0, stream=True
        )
    )
    assert chunks
    assert all(c.choices and c.usage is None for c in chunks)


def test_n2_with_seed_is_reproducible_and_equals_offline(server, tiny_llm):
    client = server.client()
    kw = {
        "model": MODEL,
        "prompt": PROMPTS[0],
        "max_tokens": 10,
        "temperature": 1.0,
        "n": 2,
        "seed": 7,
    }
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    want = offline(tiny_llm, PROMPTS[0], max_tokens=10, temperature=1.0, n=2, seed=7)[0]
    assert [c.text for c in a.choices] == [c.text for c in b.choices] == [w.text for w in want]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].text != a.choices[1].text  # two different samples
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [w.text for w in want]


def test_chat_n2_seed(server, tiny_llm):
    kw = {"max_tokens": 8, "temperature": 0.9, "n": 2, "seed": 3}
    resp = server.client().chat.completions.create(model=MODEL, messages=CHAT, **kw)
    want = tiny_llm.chat(CHAT, SamplingParams(**kw), use_tqdm=False)[0].outputs
    assert [c.message.content for c in resp.choices] == [w.text for w in want]


def test_best_of(server, tiny_llm):
    kw = {"max_tokens": 6, "temperature": 1.0, "n": 1, "best_of": 3, "seed": 11}
    resp = server.client().completions.create(model=MODEL, prompt=PROMPTS[2], **kw)
    want = offline(tiny_llm, PROMPTS[2], **kw)[0]
    assert [c.text for c in resp.choices] == [w.text for w in want]


def test_stop_strings(server, tiny_llm):
    client = server.client()
    base = offline(tiny_llm, PROMPTS[3], max_tokens=24, temperature=0, ignore_eos=True)[0][0].text
    stop = base[6:8]
    assert stop
    assert base.find(stop) >= 0
    want = offline(tiny_llm, PROMPTS[3], max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    kw = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 24, "temperature": 0, "stop": [stop]}
    kw["extra_body"] = {"ignore_eos": True}
    resp = client.completions.create(**kw)
    assert resp.choices[0].text == want[0][0].text == base[: base.find(stop)]
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].model_extra["stop_reason"] == stop
    pieces = [c.choices[0].text for c in client.completions.create(**kw, stream=True)]
    assert "".join(pieces) == want[0][0].text  # no prefix of the stop string leaked
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stop=stop
    )
    assert stop not in chat.choices[0].message.content


def test_completion_logprobs_equal_offline(server, tiny_llm):
    resp = server.client().completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3
    )
    want = offline(tiny_llm, PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)[0][0]
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(want.token_ids) == len(lp.token_logprobs) > 0
    for tid, entry, value, top in zip(
        want.token_ids, want.logprobs, lp.token_logprobs, lp.top_logprobs
    ):
        assert value == entry[tid].logprob
        # the top 3 plus the chosen token, keyed by text (byte pieces may share "\ufffd")
        assert set(top) == {e.decoded_token for e in entry.values()}
        assert 3 <= len(entry) <= 4
        assert value == max(top.values())  # greedy: the chosen token is the top one
    offsets = lp.text_offset
    assert offsets[0] == len(PROMPTS[0])
    assert offsets == sorted(offsets)


def test_echo_logprobs_for_lm_eval(server, tiny_llm):
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1."""
    ctx = tiny_llm.tokenizer.encode("The quick brown fox")
    cont = tiny_llm.tokenizer.encode(" jumps")
    prompt = ctx + cont
    resp = server.client().completions.create(
        model=MODEL, prompt=[prompt], max_tokens=1, temperature=0, echo=True, logprobs=1, seed=1
    )
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1
    assert lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    want = tiny_llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
        use_tqdm=False,
    )[0]
    for p, (tid, entry) in enumerate(zip(prompt[1:], want.prompt_logprobs[1:]), start=1):
        assert lp.token_logprobs[p] == entry[tid].logprob
        greedy = entry[tid].rank == 1
        assert (lp.token_logprobs[p] == max(lp.top_logprobs[p].values())) == greedy
    # what lm-eval computes from it
    ctxlen = len(ctx)
    total = sum(lp.token_logprobs[ctxlen:-1])
    assert total == pytest.approx(
        sum(e[t].logprob for t, e in zip(cont, want.prompt_logprobs[ctxlen:]))
    )
    text = tiny_llm.tokenizer.decode(prompt, skip_special_tokens=False)
    assert resp.choices[0].text.startswith(text)


def test_echo_without_logprobs(server):
    resp = server.client().completions.create(
        model=MODEL, prompt="Say", max_tokens=3, temperature=0, echo=True
    )
    assert resp.choices[0].text.startswith("Say")
    chunks = list(
        server.client().completions.create(
            model=MODEL, prompt="Say", max_tokens=3, temperature=0, echo=True, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text


def test_chat_logprobs(server, tiny_llm):
    resp = server.client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    want = tiny_llm.chat(
        CHAT, SamplingParams(max_tokens=5, temperature=0, logprobs=2), use_tqdm=False
    )[0].outputs[0]
    content = resp.choices[0].logprobs.content
    assert len(content) == len(want.token_ids) > 0
    for item, tid, entry in zip(content, want.token_ids, want.logprobs):
        assert item.logprob == entry[tid].logprob
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == item.logprob  # greedy
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    streamed = []
    for chunk in server.client().chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [c.logprob for c in streamed] == [c.logprob for c in content]


def test_extra_body_sampling_fields(server, tiny_llm):
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 4}
    resp = server.client().completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0.8, seed=5, extra_body=extra
    )
    want = offline(tiny_llm, PROMPTS[1], max_tokens=8, temperature=0.8, seed=5, **extra)
    assert resp.choices[0].text == want[0][0].text
    plain = offline(tiny_llm, PROMPTS[1], max_tokens=8, temperature=0.8, seed=5)
    assert want[0][0].token_ids != plain[0][0].token_ids  # the extras did something


def test_async_client_concurrent_streams(server, tiny_llm):
    prompts = [f"Prompt number {i}:" for i in range(8)]
    want = offline(tiny_llm, prompts, max_tokens=10, temperature=0)

    async def one(client, prompt):
        text = ""
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
        async for chunk in stream:
            text += chunk.choices[0].text
        return text

    async def main():
        client = server.async_client()
        texts = await asyncio.gather(*(one(client, p) for p in prompts))
        chat = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=4, temperature=0
        )
        await client.close()
        return texts, chat

    texts, chat = asyncio.run(main())
    assert texts == [w[0].text for w in want]
    assert chat.choices[0].message.content is not None
    server.assert_all_blocks_free()
