"""The paged KV cache: block size must not change results; blocks come back when requests end."""

from __future__ import annotations

import pytest
import torch

from lamina import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 7, 33, 70)]


def _generate(folder, block_size: int, prompts, **kw) -> list[list[int]]:
    llm = LLM(str(folder), dtype="float32", block_size=block_size, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    llm.engine.block_manager.check_all_free()
    return [o.outputs[0].token_ids for o in outs]


def test_block_sizes_give_identical_tokens(tiny_model_factory):
    folder, _ = tiny_model_factory("llama_gqa")
    prompts = _prompts()
    results = {bs: _generate(folder, bs, prompts) for bs in (1, 16, 256)}
    assert results[1] == results[16] == results[256]


def test_batched_equals_alone_and_chunked_prefill(tiny_model_factory):
    """Each prompt alone, all together, and with prefill split into 8-token chunks."""
    folder, _ = tiny_model_factory("llama_gqa")
    prompts = _prompts()
    together = _generate(folder, 16, prompts)
    alone = [_generate(folder, 16, [p])[0] for p in prompts]
    chunked = _generate(folder, 16, prompts, max_num_batched_tokens=8)
    assert together == alone == chunked


def test_slot_mapping_and_block_table_layout():
    from lamina.attention.metadata import AttentionMetadata

    meta = AttentionMetadata.build(
        query_lens=[3, 1], context_lens=[3, 6], block_tables=[[5], [2, 7]], block_size=4
    )
    # seq 0: positions 0..2 in block 5 -> slots 20, 21, 22; seq 1: position 5 in block 7 -> 29
    assert meta.slot_mapping.tolist() == [20, 21, 22, 29]
    assert meta.block_tables.tolist() == [[5, 0], [2, 7]]
    assert meta.decode_ids == [1]
    assert meta.prefill_ids == [0]
    assert meta.decode_buckets is not None
    assert len(meta.decode_buckets) == 1
    group = meta.decode_buckets[0]
    assert group.rows.tolist() == [3]
    assert group.mask.sum().item() == 6
    assert group.block_tables.tolist() == [[2, 7]]


@pytest.mark.slow
def test_smollm2_block_sizes(smollm2_path):
    prompts = [[504, 3575, 282, 4649, 314], list(range(100, 180))]
    results = {bs: _generate(smollm2_path, bs, prompts, max_model_len=512) for bs in (1, 16, 256)}
    assert results[1] == results[16] == results[256]


def test_decode_buckets_group_similar_context_lengths():
    """Decode sequences are attended in buckets whose longest context is at most
    DECODE_BUCKET_SPAN times the shortest (plus a block), shortest first."""
    import torch

    from lamina.attention.metadata import DECODE_BUCKET_SPAN, AttentionMetadata

    contexts = [5, 100, 7, 60, 12, 9]
    tables = [list(range(10 * i, 10 * i + -(-c // 4))) for i, c in enumerate(contexts)]
    meta = AttentionMetadata.build([1] * 6, contexts, tables, block_size=4)
    buckets = meta.decode_buckets
    assert buckets is not None
    members = [[contexts[r] for r in b.rows.tolist()] for b in buckets]
    assert members == [[5, 7, 9, 12], [60, 100]]
    for b, ctx in zip(buckets, members):
        assert max(ctx) <= DECODE_BUCKET_SPAN * min(ctx) + 4
        assert b.mask.shape[-1] == -(-max(ctx) // 4) * 4
        assert b.mask.sum(dim=-1).flatten().tolist() == ctx
        for row, table in zip(b.rows.tolist(), b.block_tables.tolist()):
            want = tables[row][: len(table)]
            assert table[: len(want)] == want
    assert not any(b.all_rows for b in buckets)
    same = AttentionMetadata.build([1, 1], [8, 8], [[1, 2], [3, 4]], block_size=4)
    assert len(same.decode_buckets) == 1
    assert same.decode_buckets[0].all_rows
    assert torch.equal(same.decode_buckets[0].rows, torch.tensor([0, 1]))
