"""The real model: SmolLM2-135M-Instruct from its GGUF, lamina vs transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from lamina import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def quicksort(arr):\n    ",
    "人工智能的未来是",
    "東京は日本の首都で、",
    "I love pizza 🍕 and tacos 🌮 because",
    "SELECT name, COUNT(*) FROM users",
    "Translate to German: The weather is nice today.",
    "    indented   text\twith\ttabs and  double  spaces",
    "The first ten prime numbers are 2, 3, 5,",
]
CHAT = [{"role": "user", "content": "Give me three tips for writing clean Python code."}]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llm(smollm2_llm):
    return smollm2_llm


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy with transformers' own KV cache, never stopping at EOS."""
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def test_greedy_tokens_identical_to_transformers(llm, hf_smollm2):
    tok, model = hf_smollm2
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "input_ids"):
        chat_ids = chat_ids["input_ids"]
    prompts = [tok.encode(p) for p in PROMPTS] + [list(chat_ids)]
    ours_chat = llm.get_tokenizer().apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True
    )
    assert ours_chat == list(chat_ids)
    for text, ids in zip(PROMPTS, prompts):
        assert llm.get_tokenizer().encode(text) == ids, text
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    mismatches = []
    for ids, out in zip(prompts, outs):
        expected = hf_greedy(model, ids, NEW_TOKENS)
        if out.outputs[0].token_ids != expected:
            mismatches.append((tok.decode(ids), out.outputs[0].token_ids, expected))
    assert not mismatches, mismatches[0]


def test_logits_close_to_transformers(llm, hf_smollm2):
    tok, model = hf_smollm2
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 4)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = llm.engine.prompt_logits(ids)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)
