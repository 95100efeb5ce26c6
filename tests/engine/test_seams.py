"""The engine's seams, exercised through their interfaces: a retention policy written here in a
few lines, the attention backend's tree mask, and beam search and prompt scoring running as
ordinary requests of the one driver loop."""

from __future__ import annotations

import random

import pytest
import torch

from lamina import LLM, BeamSearchParams, SamplingParams
from lamina.attention.registry import registered_attention_backends, select_attention_backend
from lamina.engine.llm_engine import LLMEngine
from lamina.kv.block_manager import BlockManager
from lamina.kv.retention import RetentionPolicy, SequenceKV

PROMPT = [(7 * i) % 250 + 3 for i in range(40)]
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


# ---- a third retention policy, through the interface alone (the newcomer's example) ----------
class KeepEnds(RetentionPolicy):
    """Keep each request's first `head` blocks and its last `tail` full blocks (plus the one
    being written); blocks in between return to the pool. Tokens keep their true positions,
    so keys are rotated when written and the dense attention path needs nothing new."""

    name = "keep-ends"
    allows_beam_search = False

    def __init__(self, head: int, tail: int, block_size: int) -> None:
        super().__init__(block_size)
        self.head, self.tail = head, tail

    @property
    def pinned_blocks(self) -> int:
        return self.head

    def max_blocks_per_request(self, max_model_len: int, step_tokens: int) -> int:
        bound = self.head + self.tail + -(-step_tokens // self.block_size) + 1
        return min(bound, super().max_blocks_per_request(max_model_len, step_tokens))

    def before_step(self, seq: SequenceKV, blocks: BlockManager) -> None:
        full = self.live_index(seq, seq.num_computed_tokens) // self.block_size
        while full - self.head > self.tail:
            blocks.release([seq.block_table.pop(self.head)])
            seq.num_evicted_blocks += 1
            full -= 1


def engine_with(llm: LLM, policy: RetentionPolicy) -> LLMEngine:
    e = llm.engine
    return LLMEngine(e.loaded, e.cache_config, e.scheduler_config, retention_policy=policy)


def test_toy_policy_with_a_covering_budget_equals_dense(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32", block_size=8, max_num_batched_tokens=16)
    dense = llm.generate({"prompt_token_ids": PROMPT}, GREEDY, use_tqdm=False)[0]
    engine = engine_with(llm, KeepEnds(head=1, tail=16, block_size=8))
    engine.add_request("a", PROMPT, GREEDY)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished
    assert outs[-1].outputs[0].token_ids == dense.outputs[0].token_ids
    engine.block_manager.check_all_free()


def test_toy_policy_bounds_memory_and_frees_every_block(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32", block_size=8, max_num_batched_tokens=16)
    policy = KeepEnds(head=1, tail=2, block_size=8)
    engine = engine_with(llm, policy)
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
    peak, evicted = 0, 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.block_manager.num_used_blocks)
        if "a" in engine.requests:
            evicted = engine.requests["a"].seqs[0].num_evicted_blocks
    assert evicted >= (len(PROMPT) + 200) // 8 - 5  # all but the kept ends went back
    assert peak <= policy.max_blocks_per_request(engine.scheduler_config.max_model_len, 16)
    engine.block_manager.check_all_free()
    with pytest.raises(ValueError, match="keep-ends"):
        engine.add_beam_request("b", PROMPT, BeamSearchParams())


# ---- attention backends ---------------------------------------------------------------------
def test_backend_registry_names_and_errors():
    assert "torch" in registered_attention_backends()
    assert select_attention_backend("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; accepted: auto"):
        select_attention_backend("nope", "cpu")


def _hand_written_tree_attention(q, k, v, tree, ctx, scale):
    """Per head: softmax over cached keys (all visible) and the new keys the tree allows."""
    qlen = tree.shape[0]
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for t in range(qlen):
        visible = list(range(ctx - qlen)) + [ctx - qlen + j for j in range(qlen) if tree[t, j]]
        for h in range(q.shape[1]):
            keys, values = k[visible, h // groups], v[visible, h // groups]
            weights = torch.softmax(keys @ q[t, h] * scale, dim=0)
            out[t, h] = weights @ values
    return out


def test_tree_mask_equals_hand_written_attention():
    """Five proposed tokens forming the tree 0 -> {1, 2}, 1 -> 3, 2 -> 4 after 11 cached ones."""
    from lamina.attention.metadata import AttentionMetadata
    from lamina.attention.torch_backend import TorchAttentionBackend
    from lamina.config import ModelConfig
    from lamina.kv.cache import KVCache

    torch.manual_seed(0)
    cfg = ModelConfig("llama", 10, 32, 64, 1, 4, 2, 8, 64, 1e-6)
    cache = KVCache(cfg, num_blocks=4, block_size=4, dtype=torch.float32)
    parent = [-1, 0, 0, 1, 2]
    tree = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        j = i
        while j >= 0:
            tree[i, j] = True
            j = parent[j]
    ctx, qlen = 16, 5
    keys, values = torch.randn(ctx, 2, 8), torch.randn(ctx, 2, 8)
    layer = cache.layer(0)
    table = [2, 0, 3, 1]
    slots = torch.tensor([table[p // 4] * 4 + p % 4 for p in range(ctx - qlen)])
    layer.write(keys[: ctx - qlen], values[: ctx - qlen], slots)
    q = torch.randn(qlen, 4, 8)
    meta = AttentionMetadata.build([qlen], [ctx], [table], 4)
    meta.tree_masks = [tree]
    out = TorchAttentionBackend().forward(q, keys[-qlen:], values[-qlen:], layer, meta, 8**-0.5)
    expected = _hand_written_tree_attention(q, keys, values, tree, ctx, 8**-0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # a chain (lower-triangular) tree is plain causal attention
    meta_causal = AttentionMetadata.build([qlen], [ctx], [table], 4)
    meta.tree_masks = [torch.ones(qlen, qlen, dtype=torch.bool).tril()]
    torch.testing.assert_close(
        TorchAttentionBackend().forward(q, keys[-qlen:], values[-qlen:], layer, meta, 0.3),
        TorchAttentionBackend().forward(q, keys[-qlen:], values[-qlen:], layer, meta_causal, 0.3),
    )


# ---- one driver loop --------------------------------------------------------------------------
def test_beam_search_runs_beside_sampling_requests(tiny_model_factory):
    """Beam searches interleaved with ordinary requests in one continuous batch give what each
    gives alone, and the ordinary requests are not held back."""
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32", block_size=8, max_num_batched_tokens=64)
    params = BeamSearchParams(beam_width=3, max_tokens=12)
    prompts = [PROMPT[:17], PROMPT[5:30]]
    alone = [llm.beam_search({"prompt_token_ids": p}, params)[0] for p in prompts]
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_beam_request(f"beam{i}", p, params)
        engine.add_request(f"gen{i}", p, GREEDY)
    finished_at: dict[str, int] = {}
    outs = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
                outs[out.request_id] = out
    engine.block_manager.check_all_free()
    for i, single in enumerate(alone):
        got = outs[f"beam{i}"].outputs
        assert [c.token_ids for c in got] == [b.token_ids for b in single.sequences]
        assert len(got) == 3
    for i, p in enumerate(prompts):
        gen_alone = llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0]
        assert outs[f"gen{i}"].outputs[0].token_ids == gen_alone.outputs[0].token_ids
    # not held back: one token per step from the first (a prompt chunked once may add a step)
    assert max(finished_at["gen0"], finished_at["gen1"]) <= GREEDY.max_tokens + 1


def test_scoring_request_in_chunks_equals_one_pass(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(folder), dtype="float32", block_size=8)
    whole = llm.engine.prompt_logits(PROMPT)
    chunked = llm.engine.prompt_logits(PROMPT, chunk_size=7)
    assert whole.shape == (len(PROMPT), llm.engine.model_config.vocab_size)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)
    llm.engine.block_manager.check_all_free()
    llm.engine.add_request("busy", PROMPT, GREEDY)
    with pytest.raises(RuntimeError, match="running request"):
        llm.engine.prompt_logits(PROMPT)


def test_prompt_logprobs_survive_preemption(tiny_model_factory):
    """A request preempted in the middle of its chunked prompt recomputes it; its prompt
    logprobs are recorded once per position, equal to those of an unpressured run."""
    folder, _ = tiny_model_factory("llama_gqa")
    rng = random.Random(1)
    long_prompt = [rng.randrange(3, 256) for _ in range(150)]
    decodes = [[rng.randrange(3, 256) for _ in range(60)] for _ in range(2)]
    lp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    dec = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in [*decodes, long_prompt]]
    kwargs = {"dtype": "float32", "block_size": 8, "enable_prefix_caching": False}
    tight = LLM(str(folder), num_kv_blocks=28, max_num_batched_tokens=16, **kwargs)
    roomy = LLM(str(folder), max_num_batched_tokens=16, **kwargs)
    got = tight.generate(prompts, [dec, dec, lp], use_tqdm=False)[2]
    want = roomy.generate(prompts, [dec, dec, lp], use_tqdm=False)[2]
    assert tight.engine.stats.num_preemptions > 0
    assert got.prompt_logprobs is not None
    assert len(got.prompt_logprobs) == len(long_prompt)
    assert want.prompt_logprobs is not None
    assert len(want.prompt_logprobs) == len(long_prompt)
    for a, b, token in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], long_prompt[1:]):
        assert list(a) == [token]
        assert list(b) == [token]
        assert abs(a[token].logprob - b[token].logprob) < 1e-4
