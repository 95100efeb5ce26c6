"""Beam search with beams as block-table forks, following transformers' `num_beams` semantics.

Each step scores every continuation of every live beam (cumulative log-probability), keeps the
best 2 x width candidates, finalises those among the best `width` that end (EOS or the length
limit) with score sum_logprobs / generated_len ** length_penalty, and continues with the best
`width` that do not end. A new beam forks its parent's block table, sharing every block; the
last, partly filled block is copied on write. The early-stopping rules are transformers':
True stops once `width` beams are finished, False stops when no running beam can beat the
worst finished one at the current length, "never" assumes the best case length.

It runs synchronously on the engine's model and cache (other requests wait), like vLLM's
offline `LLM.beam_search`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lamina.engine.scheduler import ScheduledBatch
from lamina.engine.sequence import Sequence
from lamina.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    token_ids: list[int]  # generated tokens (EOS included when the beam ended on it)
    cumulative_logprob: float
    score: float  # cumulative_logprob / len ** length_penalty
    text: str = ""
    finish_reason: str = "length"


@dataclass
class BeamSearchOutput:
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence] = field(default_factory=list)  # best first


def beam_search(engine, prompt_ids: list[int], params: BeamSearchParams) -> BeamSearchOutput:  # noqa: ANN001
    """Run beam search for one prompt on `engine` (an LLMEngine)."""
    if engine.policy is not None:
        raise ValueError("beam search runs on a dense KV cache; turn StreamingLLM / H2O off")
    engine.validate_prompt(prompt_ids)
    limit = engine.scheduler_config.max_model_len - len(prompt_ids)
    max_tokens = min(params.max_tokens, limit)
    width = params.beam_width
    eos = set() if params.ignore_eos else set(engine.eos_token_ids)
    keep = max(2, 1 + len(eos)) * width
    bm = engine.block_manager
    sp = SamplingParams(max_tokens=max_tokens)
    beams = [Sequence("__beam__", list(prompt_ids), sp)]
    engine.start_sequence(beams[0])
    scores = torch.zeros(1)
    finished: list[BeamSearchSequence] = []
    open_to_improve = True
    try:
        for step in range(max_tokens):
            logprobs = _forward(engine, beams)
            total = (logprobs + scores[:, None]).flatten()
            top_v, top_i = total.topk(min(keep, total.numel()))
            vocab = logprobs.shape[-1]
            gen_len = step + 1
            last = gen_len == max_tokens
            ends = [last or int(i % vocab) in eos for i in top_i.tolist()]
            for rank, (v, i) in enumerate(zip(top_v.tolist()[:width], top_i.tolist()[:width])):
                if not ends[rank] or not open_to_improve:
                    continue
                if params.early_stopping is True and len(finished) >= width:
                    continue
                parent = beams[i // vocab]
                tokens = parent.output_token_ids + [i % vocab]
                finished.append(
                    BeamSearchSequence(
                        tokens,
                        v,
                        v / gen_len**params.length_penalty,
                        finish_reason="length" if int(i % vocab) not in eos else "stop",
                    )
                )
            finished = sorted(finished, key=lambda b: b.score, reverse=True)[:width]
            survivors = [
                (v, i) for (v, i), end in zip(zip(top_v.tolist(), top_i.tolist()), ends) if not end
            ][:width]
            if not survivors or (params.early_stopping is True and len(finished) >= width):
                break
            beams = _advance(bm, beams, survivors, vocab)
            scores = torch.tensor([v for v, _ in survivors])
            open_to_improve = _can_improve(params, finished, width, scores, gen_len, max_tokens)
            if not open_to_improve:
                break
    finally:
        for seq in beams:
            bm.release(seq.block_table)
    for b in finished:
        b.text = engine.tokenizer.decode(b.token_ids)
    return BeamSearchOutput(list(prompt_ids), finished)


def _forward(engine, beams: list[Sequence]) -> torch.Tensor:  # noqa: ANN001
    """Feed each beam's uncomputed tokens; log-probabilities [beams, vocab] of the next one."""
    bm = engine.block_manager
    batch = ScheduledBatch()
    for seq in beams:
        copy = bm.copy_on_write(seq.block_table, seq.num_computed_tokens)
        if copy is not None:
            batch.copies.append(copy)
        if not bm.can_grow(seq.block_table, seq.num_tokens):
            raise RuntimeError("beam search ran out of KV blocks; raise the cache budget")
        bm.grow(seq.block_table, seq.num_tokens)
        batch.add(seq, seq.num_tokens - seq.num_computed_tokens)
    hidden, starts = engine.runner.forward(batch)
    rows = [s + n - 1 for s, n in zip(starts, batch.num_new_tokens)]
    for seq in beams:
        seq.num_computed_tokens = seq.num_tokens
    return engine.runner.logits(hidden, rows).log_softmax(dim=-1)


def _advance(
    bm,
    beams: list[Sequence],
    survivors: list[tuple[float, int]],
    vocab: int,  # noqa: ANN001
) -> list[Sequence]:
    """New beams as forks of their parents (shared blocks), each with its next token."""
    new = []
    for _, i in survivors:
        parent = beams[i // vocab]
        child = parent.fork(0, bm.fork(parent.block_table))
        child.append_token(i % vocab)
        new.append(child)
    for seq in beams:
        bm.release(seq.block_table)
    return new


def _can_improve(
    params: BeamSearchParams,
    finished: list[BeamSearchSequence],
    width: int,
    scores: torch.Tensor,
    gen_len: int,
    max_tokens: int,
) -> bool:
    """transformers' heuristic: can the best running beam still beat the worst finished one?"""
    if len(finished) < width:
        return True
    if params.early_stopping == "never" and params.length_penalty > 0:
        length = max_tokens
    else:
        length = gen_len
    best_possible = float(scores.max()) / length**params.length_penalty
    return best_possible > finished[-1].score
