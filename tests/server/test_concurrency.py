"""32 clients stream at once from one continuously batched engine on SmolLM2 and get exactly
the greedy text of offline generation, while /metrics shows them batched together."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from lamina import SamplingParams

pytestmark = pytest.mark.slow

TOPICS = """the sea, mountains, bread, a violin, rain, Paris, the moon, tigers, coffee, winter,
a library, trains, gardens, the desert, chess, honey, volcanoes, owls, a lighthouse, snow,
apples, rivers, clocks, bicycles, thunder, tea, the forest, kites, bridges, whales, candles,
the sun""".replace("\n", " ").split(", ")
MAX_TOKENS = 16


def test_32_concurrent_streams_equal_offline(smol_server, smollm2_llm, metric):
    assert len(TOPICS) == 32
    convs = [[{"role": "user", "content": f"Write one sentence about {t}."}] for t in TOPICS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    texts = [f"A short story about {t}:" for t in TOPICS[1::2]]
    tok = smollm2_llm.tokenizer
    prompts = [
        {"prompt_token_ids": tok.apply_chat_template(convs[i], tokenize=True)}
        if i % 2 == 0
        else texts[i // 2]
        for i in range(32)
    ]  # as LLM.chat builds them; one offline batch for all 32
    want = [o.outputs[0].text for o in smollm2_llm.generate(prompts, params, use_tqdm=False)]

    async def one(client, i: int) -> tuple[str, int]:
        kw = {
            "model": "smollm2",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        text, used = "", 0
        if i % 2 == 0:
            stream = await client.chat.completions.create(messages=convs[i], **kw)
        else:
            stream = await client.completions.create(prompt=texts[i // 2], **kw)
        async for chunk in stream:
            if chunk.choices:
                c = chunk.choices[0]
                text += (c.delta.content or "") if i % 2 == 0 else c.text
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return text, used

    async def watch(stop: asyncio.Event) -> float:
        peak = 0.0
        async with httpx.AsyncClient(base_url=smol_server.base_url, timeout=30) as c:
            while not stop.is_set():
                text = (await c.get("/metrics")).text
                peak = max(peak, metric(text, "lamina:num_requests_running"))
                await asyncio.sleep(0.05)
        return peak

    async def main():
        client = smol_server.async_client()
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        results = await asyncio.gather(*(one(client, i) for i in range(32)))
        stop.set()
        peak = await watcher
        await client.close()
        return results, peak

    results, peak = asyncio.run(main())
    assert [t for t, _ in results] == want
    assert all(0 < used <= MAX_TOKENS for _, used in results)
    assert peak > 1, "requests never ran together"
    print(f"peak running requests: {peak:.0f}")
    smol_server.assert_all_blocks_free()
