"""Batched sampling over rows with different settings.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which picks index i with
probability p_i. Each row draws its noise from its own sequence's generator, so a seeded request
gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from lamina.engine.sequence import Sequence


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus. top_k 0 = off."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep a token if the mass strictly before it is < top_p (the top token is always kept)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of float32 logits [B, V]."""
        params = [s.sampling_params for s in seqs]
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy.tolist()
        temps = torch.tensor(
            [p.temperature if not p.greedy else 1.0 for p in params], dtype=logits.dtype
        )
        top_k = torch.tensor([p.top_k for p in params])
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        scaled = logits / temps.unsqueeze(1)
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params])
        return torch.where(is_greedy, greedy, sampled).tolist()
