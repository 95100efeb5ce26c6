"""The online-softmax reference backend and the torch backend against attention written out in
float64 from the same cached K/V: ragged batches, block boundaries, GQA ratios 1 / 3 / 8, head
dims 64 / 128, contexts up to 4,097, split-K merges, tree masks, StreamingLLM windows, int8 KV."""

from __future__ import annotations

import pytest
import torch

from lamina import LLM, SamplingParams
from lamina.attention.online_softmax import OnlineSoftmaxBackend
from lamina.attention.registry import select_attention_backend
from lamina.attention.torch_backend import TorchAttentionBackend
from lamina.kv.h2o import H2OAttention
from lamina.kv.streaming import StreamingWindow
from lamina.layers.rotary import RotaryEmbedding
from tests.attention_cases import build_case, run, truth

RAGGED = [(1, 1), (5, 1), (16, 1), (17, 1), (33, 33), (40, 7), (129, 64), (300, 1)]


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bs", [4, 16])
def test_backends_equal_dense_softmax_on_ragged_batches(heads, kv_heads, dim, bs):
    case = build_case(heads, kv_heads, dim, bs, RAGGED)
    for backend in (OnlineSoftmaxBackend(blocks_per_split=3), TorchAttentionBackend()):
        got = run(backend, case)
        torch.testing.assert_close(got, truth(case[3], case[1], case[2], 0.125), atol=2e-5, rtol=0)


def test_split_k_merge_does_not_change_the_result_and_long_contexts_work():
    case = build_case(8, 1, 64, 16, [(4097, 1), (1000, 3)])
    first = run(OnlineSoftmaxBackend(), case)  # also writes the new tokens' K/V
    want = truth(case[3], case[1], case[2], 0.125)
    torch.testing.assert_close(first, want, atol=2e-5, rtol=0)
    for split in (1, 4, 1000):  # many splits, several, one
        torch.testing.assert_close(
            run(OnlineSoftmaxBackend(blocks_per_split=split), case), want, atol=2e-5, rtol=0
        )


def test_short_chunks_over_a_cache_join_the_batched_decode_path():
    """A verifying sequence's 1 + k tokens (and a prompt's short last chunk) are attended as
    rows of the batched decode path, each row's context ending at itself; a first chunk and a
    long one go one by one; all equal the float64 truth."""
    shapes = [(50, 5), (9, 1), (12, 12), (300, 9), (20, 8)]
    case = build_case(6, 2, 64, 4, shapes)
    meta = case[2]
    assert meta.batched_ids == [0, 1, 4]
    assert meta.chunk_ids == [2, 3]
    got = run(TorchAttentionBackend(), case)
    torch.testing.assert_close(got, truth(case[3], case[1], case[2], 0.125), atol=2e-5, rtol=0)


def test_tree_masks_on_both_backends():
    case = build_case(6, 2, 64, 4, [(21, 5), (9, 1), (5, 5)])
    parent = [-1, 0, 0, 1, 2]
    tree = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        j = i
        while j >= 0:
            tree[i, j], j = True, parent[j]
    case[2].tree_masks = [tree, None, tree]
    run(TorchAttentionBackend(), case)  # writes the new tokens' K/V
    want = truth(case[3], case[1], case[2], 0.125)
    for backend in (OnlineSoftmaxBackend(blocks_per_split=2), TorchAttentionBackend()):
        torch.testing.assert_close(run(backend, case), want, atol=2e-5, rtol=0)


def test_streaming_window_with_sinks_and_evicted_blocks():
    case = build_case(4, 2, 64, 4, [(24, 1), (30, 6)])
    cfg = case[0]
    rotary = RotaryEmbedding(cfg)
    case[2].retention = StreamingWindow(sinks=3, window=10, sink_limit=4, offsets=[12, 40])
    run(TorchAttentionBackend(), case, rotary=rotary)  # writes the new tokens' K/V
    want = truth(case[3], case[1], case[2], 0.125, rotary)
    for backend in (OnlineSoftmaxBackend(blocks_per_split=2), TorchAttentionBackend()):
        torch.testing.assert_close(run(backend, case, rotary=rotary), want, atol=2e-5, rtol=0)


def test_int8_kv_cache():
    case = build_case(6, 2, 64, 16, RAGGED, kv_dtype="int8")
    ref = run(OnlineSoftmaxBackend(blocks_per_split=2), case)
    torch.testing.assert_close(ref, truth(case[3], case[1], case[2], 0.125), atol=2e-5, rtol=0)
    # the torch backend attends a first prefill chunk over its fresh (unquantized) K/V and
    # everything else through the cache: only those chunks differ, by int8's rounding
    meta = case[2]
    got = run(TorchAttentionBackend(), case)
    for i in range(meta.num_seqs):
        rows = slice(meta.query_starts[i], meta.query_starts[i] + meta.query_lens[i])
        fresh = meta.context_lens[i] == meta.query_lens[i] > 1
        torch.testing.assert_close(got[rows], ref[rows], atol=0.05 if fresh else 2e-5, rtol=0)


def test_registry_refuses_what_the_reference_cannot_run():
    assert select_attention_backend("reference").name == "reference"
    assert select_attention_backend("auto").name == "torch"  # the reference is never auto
    with pytest.raises(ValueError, match="'reference' does not implement H2OAttention"):
        select_attention_backend("reference", retention=H2OAttention)


def test_engine_on_the_reference_backend_gives_the_same_tokens(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    prompts = [
        {"prompt_token_ids": [(7 * i + j) % 250 + 3 for i in range(9 + 13 * j)]} for j in range(4)
    ]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for extra in ({}, {"attention_sinks": 4, "sliding_window": 16}):
        base = dict(dtype="float32", block_size=8, max_num_batched_tokens=16, **extra)
        want = LLM(str(folder), **base).generate(prompts, params, use_tqdm=False)
        ref = LLM(str(folder), attention_backend="reference", **base)
        got = ref.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    with pytest.raises(ValueError, match="does not implement H2OAttention"):
        LLM(str(folder), attention_backend="reference", h2o_heavy=8, h2o_recent=8)
