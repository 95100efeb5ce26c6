"""The "cpu-paged" backend (C++ kernel reading the paged cache in place) held to float64
attention: ragged batches, block boundaries, GQA ratios 1 / 3 / 8, head dims 64 / 128,
contexts 1 .. 4,097, tree masks, StreamingLLM sinks + window, int8 KV, split-K on and off;
and SmolLM2's greedy tokens on it equal the torch path's."""

from __future__ import annotations

import pytest
import torch

from lamina.attention import extension
from lamina.attention.cpu_paged import CpuPagedAttentionBackend
from lamina.attention.online_softmax import OnlineSoftmaxBackend
from lamina.attention.registry import select_attention_backend
from lamina.kv.h2o import H2OAttention
from lamina.kv.streaming import StreamingWindow
from lamina.layers.rotary import RotaryEmbedding
from tests.attention_cases import build_case, run, truth

PAGED = CpuPagedAttentionBackend()
RAGGED = [(1, 1), (5, 1), (16, 1), (17, 1), (33, 33), (40, 7), (129, 64), (300, 1)]

pytestmark = pytest.mark.skipif(
    not CpuPagedAttentionBackend.available(torch.device("cpu")),
    reason=f"the paged kernel is not built here: {extension.kernel_failure('paged_attention')}",
)


def paged_case(heads, kv_heads, dim, bs, shapes, **kw):
    return build_case(heads, kv_heads, dim, bs, shapes, metadata=PAGED.build_metadata, **kw)


def assert_truth(got, case, atol=2e-5):
    torch.testing.assert_close(got, truth(case[3], case[1], case[2], 0.125), atol=atol, rtol=0)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("split_keys", [0, -1, 64])
def test_paged_equals_dense_softmax_on_ragged_batches(heads, kv_heads, dim, bs, split_keys):
    case = paged_case(heads, kv_heads, dim, bs, RAGGED)
    assert_truth(run(CpuPagedAttentionBackend(split_keys=split_keys), case), case)


def test_odd_head_dim_and_block_size():
    case = paged_case(6, 2, 80, 5, RAGGED)
    assert_truth(run(PAGED, case), case)


def test_long_contexts_with_and_without_split_k():
    case = paged_case(9, 3, 64, 16, [(4097, 1), (1000, 3), (2100, 100)])
    first = run(CpuPagedAttentionBackend(split_keys=-1), case)  # writes the new K/V
    assert_truth(first, case)
    for split in (0, 64, 256, 1000):
        got = run(CpuPagedAttentionBackend(split_keys=split), case)
        torch.testing.assert_close(got, first, atol=2e-5, rtol=0)
    # a lone long decode: the automatic split cuts it across the threads
    one = paged_case(8, 1, 128, 16, [(4097, 1)], seed=3)
    assert_truth(run(PAGED, one), one)


def test_every_context_length_around_the_tiles():
    shapes = [(n, 1) for n in (1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 513)]
    case = paged_case(6, 2, 64, 16, shapes + [(n, n) for n in (31, 32, 33, 65)])
    assert_truth(run(PAGED, case), case)


def test_tree_masks():
    case = paged_case(6, 2, 64, 4, [(21, 5), (9, 1), (5, 5), (100, 40)])
    parent = [-1, 0, 0, 1, 2]
    tree = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        j = i
        while j >= 0:
            tree[i, j], j = True, parent[j]
    wide = torch.rand(40, 40) < 0.3
    wide |= torch.eye(40, dtype=torch.bool)
    case[2].tree_masks = [tree, None, tree, wide]
    got = run(PAGED, case)
    assert_truth(got, case)
    ref = run(OnlineSoftmaxBackend(blocks_per_split=2), case)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_int8_cache_and_bfloat16():
    case = paged_case(6, 2, 64, 16, [*RAGGED, (2000, 1)], kv_dtype="int8")
    got = run(PAGED, case)  # writes (quantizes) the new tokens' K/V
    assert_truth(got, case)
    ref = run(OnlineSoftmaxBackend(blocks_per_split=2), case)  # reads the same int8 cache
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    case = paged_case(9, 3, 64, 16, RAGGED, dtype=torch.bfloat16)
    got = run(PAGED, case)
    assert case[3].dtype == torch.bfloat16
    assert_truth(got, case, atol=1e-2)
    case = paged_case(9, 3, 64, 16, RAGGED, dtype=torch.bfloat16, kv_dtype="int8")
    assert_truth(run(PAGED, case), case, atol=1e-2)


@pytest.mark.parametrize("split_keys", [0, -1, 8])
def test_streaming_window_with_sinks_and_evicted_blocks(split_keys):
    case = paged_case(4, 2, 64, 4, [(24, 1), (30, 6), (300, 1), (200, 70)])
    rotary = RotaryEmbedding(case[0])
    case[2].retention = StreamingWindow(sinks=3, window=10, sink_limit=4, offsets=[12, 40, 7, 100])
    backend = CpuPagedAttentionBackend(split_keys=split_keys)
    got = run(backend, case, rotary=rotary)  # writes the new tokens' K/V
    want = truth(case[3], case[1], case[2], 0.125, rotary)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    ref = run(OnlineSoftmaxBackend(blocks_per_split=2), case, rotary=rotary)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_thread_counts_agree():
    case = paged_case(9, 3, 64, 16, [(3000, 1), (700, 50)])
    want = run(PAGED, case)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.testing.assert_close(run(PAGED, case), want, atol=2e-5, rtol=0)
    finally:
        torch.set_num_threads(threads)


def test_registry_names_it_refuses_retention_and_says_why_it_is_missing(monkeypatch):
    assert select_attention_backend("cpu-paged").name == "cpu-paged"
    assert select_attention_backend("auto").name in ("torch", "cpu-paged")
    with pytest.raises(ValueError, match="'cpu-paged' does not implement H2OAttention"):
        select_attention_backend("cpu-paged", retention=H2OAttention)
    assert select_attention_backend("cpu-paged", retention=StreamingWindow).name == "cpu-paged"
    assert select_attention_backend("auto", retention=H2OAttention).name == "torch"
    monkeypatch.setenv("LAMINA_DISABLE_KERNELS", "1")
    extension.load_kernel.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"'cpu-paged' is not available on cpu: C\+\+"):
            select_attention_backend("cpu-paged")
        assert select_attention_backend("auto").name == "torch"
    finally:
        monkeypatch.delenv("LAMINA_DISABLE_KERNELS")
        extension.load_kernel.cache_clear()
    assert select_attention_backend("cpu-paged").name == "cpu-paged"


def test_engine_on_cpu_paged_gives_the_torch_tokens(tiny_model_factory):
    from lamina import LLM, SamplingParams

    folder, _ = tiny_model_factory("llama_gqa")
    prompts = [
        {"prompt_token_ids": [(7 * i + j) % 250 + 3 for i in range(9 + 13 * j)]} for j in range(4)
    ]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for extra in ({}, {"attention_sinks": 4, "sliding_window": 16}):
        base = {"dtype": "float32", "block_size": 8, "max_num_batched_tokens": 16, **extra}
        want = LLM(str(folder), attention_backend="torch", **base).generate(
            prompts, params, use_tqdm=False
        )
        got = LLM(str(folder), attention_backend="cpu-paged", **base).generate(
            prompts, params, use_tqdm=False
        )
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@pytest.fixture(scope="module")
def smollm2_paged(smollm2_path):
    """lamina on the SmolLM2 GGUF, float32, on the cpu-paged backend."""
    from lamina import LLM

    return LLM(
        str(smollm2_path), dtype="float32", max_model_len=1024, attention_backend="cpu-paged"
    )


@pytest.mark.slow
def test_smollm2_greedy_equals_the_torch_path(smollm2_path, smollm2_paged):
    from lamina import LLM, SamplingParams

    torch_llm = LLM(
        str(smollm2_path), dtype="float32", max_model_len=1024, attention_backend="torch"
    )
    prompts = [
        "The capital of France is",
        "Write a haiku about the sea.",
        "def fibonacci(n):",
        "List three prime numbers greater than 100:",
        "Once upon a time, in a village by the mountains,",
        "Explain photosynthesis to a child." * 8,
    ]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    want = torch_llm.generate(prompts, params, use_tqdm=False)
    got = smollm2_paged.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
