"""Turns a scheduler output into flat model inputs and runs the forward pass."""

from __future__ import annotations

import torch

from lamina.attention.base import AttentionBackend
from lamina.engine.scheduler import SchedulerOutput
from lamina.kv.cache import KVCache
from lamina.kv.retention import RetentionPolicy
from lamina.models.llama import LlamaForCausalLM


class ModelRunner:
    """Owns the model's view of one step: token ids, rotary positions and attention metadata.
    The retention policy lays the new tokens out in the cache; the attention backend turns
    that layout into its metadata."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        cache: KVCache,
        policy: RetentionPolicy,
        backend: AttentionBackend,
    ) -> None:
        self.model = model
        self.cache = cache
        self.policy = policy
        self.backend = backend
        model.set_attention_backend(backend)
        self.kv = [cache.layer(i) for i in range(model.config.num_hidden_layers)]

    @torch.inference_mode()
    def forward(self, batch: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Hidden states [T, hidden] of every fed token, and each sequence's first row."""
        self.cache.copy_blocks(batch.copies)
        ids: list[int] = []
        starts: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            starts.append(len(ids))
            ids.extend(seq.fed_tokens(start, n))
        layout = self.policy.layout(batch.seqs, batch.num_new_tokens)
        meta = self.backend.build_metadata(
            list(batch.num_new_tokens),
            layout.context_lens,
            [s.block_table for s in batch.seqs],
            self.cache.block_size,
            slot_mapping=layout.slot_mapping,
        )
        meta.retention = layout.attention
        rope = [s.rope_len or 0 for s in batch.seqs]
        if any(rope):  # dynamic NTK past the trained context: the base of each token's sequence
            meta.rope_seq_lens = rope
            meta.rope_lens = torch.tensor(rope).repeat_interleave(
                torch.tensor(batch.num_new_tokens)
            )
        hidden = self.model(torch.tensor(ids), torch.tensor(layout.positions), self.kv, meta)
        return hidden, starts

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Float32 logits for the chosen hidden rows only (the vocabulary matmul is costly)."""
        if not rows:
            return torch.empty(0, self.model.config.vocab_size)
        return self.model.compute_logits(hidden[torch.tensor(rows)])
