"""Turns a scheduled batch into flat model inputs and runs the forward pass."""

from __future__ import annotations

import torch

from lamina.attention.metadata import AttentionMetadata, H2OAttention, StreamingWindow
from lamina.engine.scheduler import ScheduledBatch
from lamina.kv.cache import KVCache
from lamina.kv.h2o import H2OPolicy
from lamina.kv.policies import StreamingPolicy
from lamina.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cache: KVCache,
        policy: StreamingPolicy | H2OPolicy | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.policy = policy
        self.kv = [cache.layer(i) for i in range(model.config.num_hidden_layers)]

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Hidden states [T, hidden] of every fed token, and each sequence's first row."""
        self.cache.copy_blocks(batch.copies)
        ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        starts: list[int] = []
        offsets: list[int] = []
        bs = self.cache.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            starts.append(len(ids))
            ids.extend(seq.token_ids[start : start + n])
            # Positions index the live (compacted) cache: logical positions unless a retention
            # policy evicted blocks, as StreamingLLM prescribes.
            live = start - seq.evicted_tokens(bs)
            positions.extend(range(live, live + n))
            context_lens.append(live + n)
            offsets.append(seq.evicted_tokens(bs))
        meta = AttentionMetadata.build(
            list(batch.num_new_tokens),
            context_lens,
            [s.block_table for s in batch.seqs],
            bs,
            slots_from_tables=not isinstance(self.policy, H2OPolicy),  # H2O assigns its own
        )
        if isinstance(self.policy, StreamingPolicy):
            meta.streaming = StreamingWindow(
                self.policy.sinks, self.policy.window, self.policy.sink_blocks * bs, offsets
            )
        elif isinstance(self.policy, H2OPolicy):
            meta.h2o, meta.slot_mapping = self._h2o_layout(batch)
            if self.policy.cache_positions:  # each new token at its rank among the kept ones
                positions = []
                for kept, n in zip(meta.h2o.slots, batch.num_new_tokens):
                    positions.extend(range(len(kept) - n, len(kept)))
        rope = [s.rope_len or 0 for s in batch.seqs]
        if any(rope):  # dynamic NTK past the trained context: the base of each token's sequence
            meta.rope_seq_lens = rope
            meta.rope_lens = torch.tensor(rope).repeat_interleave(
                torch.tensor(batch.num_new_tokens)
            )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv, meta)
        return hidden, starts

    def _h2o_layout(self, batch: ScheduledBatch) -> tuple[H2OAttention, torch.Tensor]:
        """Give the new tokens slots (holes first) and list every sequence's kept tokens."""
        assert isinstance(self.policy, H2OPolicy)
        slots: list[int] = []
        info = H2OAttention([], [], [], cache_positions=self.policy.cache_positions)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.h2o is not None
            start = seq.num_computed_tokens
            slots += self.policy.assign(seq.h2o, seq.block_table, range(start, start + n))
            info.slots.append(torch.tensor(seq.h2o.slots))
            info.positions.append(torch.tensor(seq.h2o.positions))
            info.scores.append(seq.h2o.scores)
        return info, torch.tensor(slots, dtype=torch.int64)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Float32 logits for the chosen hidden rows only (the vocabulary matmul is costly)."""
        if not rows:
            return torch.empty(0, self.model.config.vocab_size)
        return self.model.compute_logits(hidden[torch.tensor(rows)])
