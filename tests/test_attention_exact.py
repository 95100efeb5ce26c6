"""The batch-invariant "exact" attention backend (C++ kernel) and the one-row GEMM rule: held to
float64 attention, and bit-identical per token whatever shares its call (other sequences, its
own prefill chunk, block-table padding, the thread count)."""

from __future__ import annotations

import pytest
import torch

from lamina.attention import extension
from lamina.attention.exact import ExactAttentionBackend
from lamina.attention.online_softmax import OnlineSoftmaxBackend
from lamina.attention.registry import select_attention_backend
from lamina.layers.linear import can_pack, pack_weight, packed_linear
from tests.attention_cases import build_case, run, truth

EXACT = ExactAttentionBackend()
RAGGED = [(1, 1), (5, 1), (16, 1), (17, 1), (33, 33), (40, 7), (129, 64), (300, 1)]

pytestmark = pytest.mark.skipif(
    not ExactAttentionBackend.available(torch.device("cpu")),
    reason=f"the exact kernel is not built here: {extension.kernel_failure('exact_attention')}",
)


def exact_case(heads, kv_heads, dim, bs, shapes, **kw):
    return build_case(heads, kv_heads, dim, bs, shapes, metadata=EXACT.build_metadata, **kw)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dim", [64, 80, 128])
@pytest.mark.parametrize("bs", [4, 16])
def test_exact_equals_dense_softmax_on_ragged_batches(heads, kv_heads, dim, bs):
    case = exact_case(heads, kv_heads, dim, bs, RAGGED)
    got = run(EXACT, case)
    torch.testing.assert_close(got, truth(case[3], case[1], case[2], 0.125), atol=2e-5, rtol=0)


def test_long_context_and_bfloat16():
    case = exact_case(9, 3, 64, 16, [(4097, 1), (700, 300)])
    torch.testing.assert_close(
        run(EXACT, case), truth(case[3], case[1], case[2], 0.125), atol=2e-5, rtol=0
    )
    case = exact_case(9, 3, 64, 16, RAGGED, dtype=torch.bfloat16)
    got = run(EXACT, case)
    assert case[3].dtype == torch.bfloat16
    torch.testing.assert_close(got, truth(case[3], case[1], case[2], 0.125), atol=1e-2, rtol=0)


def test_int8_cache_matches_the_reference_backend():
    case = exact_case(6, 2, 64, 16, RAGGED, kv_dtype="int8")
    got = run(EXACT, case)  # writes (quantizes) the new tokens' K/V
    ref = run(OnlineSoftmaxBackend(blocks_per_split=2), case)  # reads the same int8 cache
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def _token_alone(case, t: int) -> torch.Tensor:
    """Token t attended as a one-token batch: its sequence's cache as it stands, t's key count."""
    _, layer, meta, q, _, _ = case
    seq = int(meta.token_seqs[t])
    table = meta.block_tables[seq].tolist()
    keys = int(meta.token_keys[t])
    one = EXACT.build_metadata([1], [keys], [table], meta.block_size)
    kernel = extension.load_kernel("exact_attention")
    return kernel.exact_paged_attention(
        q[t : t + 1].contiguous(),
        layer.k,
        layer.v,
        layer.k_scale,
        layer.v_scale,
        one.block_tables,
        one.token_seqs,
        one.token_keys,
        0.125,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_every_token_equals_itself_alone(dtype, kv_dtype):
    """A token of a 64-token prefill chunk, or of a decode batch, gets the same bits as when it
    is decoded alone over the same cache: the property batch invariance rests on."""
    case = exact_case(9, 3, 64, 16, RAGGED, dtype=dtype, kv_dtype=kv_dtype)
    together = run(EXACT, case)  # also writes every new token's K/V
    for t in range(case[3].shape[0]):
        assert torch.equal(_token_alone(case, t).double(), together[t : t + 1]), t


def test_padding_and_threads_do_not_change_a_bit():
    case = exact_case(9, 3, 64, 16, RAGGED, dtype=torch.bfloat16)
    meta = case[2]
    want = run(EXACT, case)
    wide = torch.cat([meta.block_tables, torch.zeros(meta.num_seqs, 7, dtype=torch.long)], 1)
    meta.block_tables = wide
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(run(EXACT, case), want), n
    finally:
        torch.set_num_threads(threads)


def test_registry_never_picks_exact_for_auto_and_names_why_it_is_missing(monkeypatch):
    assert select_attention_backend("auto").name == "torch"
    assert select_attention_backend("exact").name == "exact"
    monkeypatch.setenv("LAMINA_DISABLE_KERNELS", "1")
    extension.load_kernel.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"'exact' is not available on cpu: C\+\+ kernels are"):
            select_attention_backend("exact")
    finally:
        monkeypatch.delenv("LAMINA_DISABLE_KERNELS")
        extension.load_kernel.cache_clear()
    assert select_attention_backend("exact").name == "exact"


@pytest.mark.skipif(not can_pack(torch.ones(1, 1)), reason="no oneDNN packed GEMM here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lone_row_is_computed_as_a_row_of_a_batch(dtype):
    """With min_rows=2 a single row gets the bits it gets among any number of rows (oneDNN's
    one-row kernel sums in another order; the K sizes are those where it does here)."""
    torch.manual_seed(0)
    for k_dim, n_dim in [(1536, 576), (2048, 256), (576, 1536)]:
        packed = pack_weight((torch.randn(n_dim, k_dim) * 0.05).to(dtype))
        x = torch.randn(70, k_dim).to(dtype)
        alone = torch.cat([packed_linear(x[i : i + 1], packed, min_rows=2) for i in range(70)])
        for rows in (2, 3, 5, 16, 17, 70):
            assert torch.equal(packed_linear(x[:rows], packed), alone[:rows]), (k_dim, rows)
