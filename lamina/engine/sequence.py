"""A sequence: one prompt plus the tokens generated for it, and where its KV lives."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from lamina.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids, block table and decoding state of one generated continuation.

    `num_computed_tokens` counts tokens whose K/V are already in the cache; the scheduler feeds
    the rest (a prompt chunk, or the one newest token) in the next step.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""  # detokenized output (stop strings already cut)
    generator: torch.Generator | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)
        seed = self.sampling_params.seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
