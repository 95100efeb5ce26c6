"""What attention needs to know about one batched forward step over a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.kv.retention import RetentionAttention

# A decode bucket's longest context is at most this many times its shortest (plus a block): the
# batched decode pads every context to its bucket's longest, so mixed lengths are split into a
# few buckets instead of all being padded to the longest of the batch.
DECODE_BUCKET_SPAN = 2.0
# A chunk of at most this many new tokens over cached context (a sequence verifying guessed
# tokens, a prompt's short last chunk) joins the batched decode path, one row per token: token
# j of the chunk is a decode query whose context ends at itself, which is the causal mask.
SHORT_CHUNK = 8


@dataclass
class DecodeBucket:
    """Decode sequences of similar context length, attended in one padded, masked call."""

    rows: torch.Tensor  # [g] their query rows in the flat batch
    block_tables: torch.Tensor  # [g, nblocks] covering the bucket's longest context
    mask: torch.Tensor  # [g, 1, 1, nblocks * block_size] bool, True where a key is visible
    all_rows: bool = False  # the bucket is every row of the batch, in order


def decode_buckets(
    rows: list[int],
    contexts: list[int],
    tables: torch.Tensor,
    block_size: int,
    num_tokens: int,
    device: torch.device | str,
) -> list[DecodeBucket]:
    """Split decode sequences (their rows, context lengths and padded block tables) into buckets
    by context length, shortest first (see DECODE_BUCKET_SPAN)."""
    order = sorted(range(len(rows)), key=lambda j: contexts[j])
    spans: list[list[int]] = []
    for j in order:
        if not spans or contexts[j] > DECODE_BUCKET_SPAN * contexts[spans[-1][0]] + block_size:
            spans.append([])
        spans[-1].append(j)
    buckets = []
    for members in spans:
        ctx = torch.tensor([contexts[j] for j in members], device=device)
        width = max(contexts[j] for j in members)
        nblocks = -(-width // block_size)
        keys = torch.arange(nblocks * block_size, device=device)
        picked = [rows[j] for j in members]
        buckets.append(
            DecodeBucket(
                rows=torch.tensor(picked, device=device),
                block_tables=tables[members][:, :nblocks],
                mask=(keys[None, :] < ctx[:, None])[:, None, None, :],
                all_rows=picked == list(range(num_tokens)),
            )
        )
    return buckets


@dataclass
class AttentionMetadata:
    """Per-step layout of the flat token batch.

    Tokens of all sequences are concatenated in one dimension. Sequence i contributes
    `query_lens[i]` new tokens starting at `query_starts[i]`; after this step its cache holds
    `context_lens[i]` tokens (earlier ones included). New K/V go to `slot_mapping` (flat slot =
    block * block_size + offset); all of a sequence's K/V are read through `block_tables[i]`.
    """

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    query_lens: list[int]
    context_lens: list[int]
    query_starts: list[int]
    block_size: int
    # Indices (into the batch) of decode sequences (query_len == 1) and of the others.
    decode_ids: list[int]
    prefill_ids: list[int]
    # For the batched decode path: the sequences it takes (decode ones and short chunks over
    # cached context, SHORT_CHUNK), their token rows bucketed by context length; the others
    # (`chunk_ids`) are attended one by one.
    decode_buckets: list[DecodeBucket] | None = None
    batched_ids: list[int] | None = None
    chunk_ids: list[int] | None = None
    # What a retention policy adds (StreamingLLM's window, H2O's kept slots), or None (dense).
    retention: RetentionAttention | None = None
    # Per sequence, a [query_len, query_len] bool mask among its new tokens (True: may attend)
    # replacing the causal mask among them, for verifying a tree of proposed tokens in one
    # pass; every cached token stays visible. None (or a None entry): causal.
    tree_masks: list[torch.Tensor | None] | None = None
    # Dynamic NTK: the length whose base each token [T] / each sequence [B] uses (0: trained
    # base); None when every sequence uses the trained base.
    rope_lens: torch.Tensor | None = None
    rope_seq_lens: list[int] | None = None

    @property
    def keys_rotated_on_read(self) -> bool:
        """Keys are cached un-rotated (positions are cache ranks that shift on eviction)."""
        return self.retention is not None and self.retention.keys_rotated_on_read

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @staticmethod
    def build(
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        slot_mapping: torch.Tensor | None = None,
    ) -> AttentionMetadata:
        """Derive slot mapping (unless given: the tables' next slots), padded block tables and
        the decode buckets from per-sequence facts."""
        slots: list[int] = []
        starts: list[int] = []
        pos = 0
        for qlen, ctx, table in zip(query_lens, context_lens, block_tables):
            starts.append(pos)
            pos += qlen
            if slot_mapping is None:
                slots.extend(
                    table[p // block_size] * block_size + p % block_size
                    for p in range(ctx - qlen, ctx)
                )
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        decode_ids = [i for i, q in enumerate(query_lens) if q == 1]
        prefill_ids = [i for i, q in enumerate(query_lens) if q != 1]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device)
            if slot_mapping is None
            else slot_mapping.to(device),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device),
            query_lens=query_lens,
            context_lens=context_lens,
            query_starts=starts,
            block_size=block_size,
            decode_ids=decode_ids,
            prefill_ids=prefill_ids,
        )
        meta.batch_rows(
            [
                i
                for i, (q, c) in enumerate(zip(query_lens, context_lens))
                if q == 1 or (q <= SHORT_CHUNK and c > q)
            ],
            device,
        )
        return meta

    def batch_rows(self, ids: list[int], device: torch.device | str = "cpu") -> None:
        """Attend sequences `ids` in the batched decode path (one row per new token), the
        others one by one."""
        rows: list[int] = []
        contexts: list[int] = []
        owners: list[int] = []
        for i in ids:
            qlen, ctx, start = self.query_lens[i], self.context_lens[i], self.query_starts[i]
            rows.extend(range(start, start + qlen))
            contexts.extend(range(ctx - qlen + 1, ctx + 1))
            owners.extend([i] * qlen)
        taken = set(ids)
        self.batched_ids = list(ids)
        self.chunk_ids = [i for i in range(self.num_seqs) if i not in taken]
        self.decode_buckets = None
        if rows:
            total = sum(self.query_lens)
            self.decode_buckets = decode_buckets(
                rows, contexts, self.block_tables[owners], self.block_size, total, device
            )
