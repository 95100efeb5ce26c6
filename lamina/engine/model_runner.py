"""Turns a scheduled batch into model inputs, runs the forward pass, returns logits."""

from __future__ import annotations

import torch

from lamina.attention.metadata import AttentionMetadata
from lamina.engine.scheduler import ScheduledBatch
from lamina.kv.cache import KVCache
from lamina.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.kv = [cache.layer(i) for i in range(model.config.num_hidden_layers)]

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, all_logits: bool = False
    ) -> tuple[torch.Tensor, list[int]]:
        """Forward the batch. Returns logits for the sequences that sample this step (those whose
        tokens are now all computed) and their indices in the batch. With `all_logits`, logits
        for every fed token are returned instead (used for prompt log-probabilities)."""
        ids: list[int] = []
        positions: list[int] = []
        query_lens, context_lens, tables = [], [], []
        sample_rows: list[int] = []
        sampling: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sampling.append(i)
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.cache.block_size)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv, meta)
        if all_logits:
            return self.model.compute_logits(hidden), sampling
        return self.model.compute_logits(hidden[sample_rows]), sampling
