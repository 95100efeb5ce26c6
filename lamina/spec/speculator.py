"""Which running sequences speculate this step, and with how many proposed tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lamina.engine.sequence import Sequence
from lamina.spec.config import SpeculativeConfig
from lamina.spec.medusa import MedusaHeads, MedusaProposer
from lamina.spec.ngram import NgramProposer
from lamina.spec.proposer import Proposer

# (config, the target model) -> proposer
ProposerFactory = Callable[[SpeculativeConfig, Any], Proposer]


def _medusa(config: SpeculativeConfig, model: Any) -> Proposer:
    c = model.config
    heads = MedusaHeads.load(config.model or "", c.hidden_size, c.vocab_size)
    return MedusaProposer(heads, model)


_PROPOSERS: dict[str, ProposerFactory] = {
    "ngram": lambda c, m: NgramProposer(c.prompt_lookup_max, c.prompt_lookup_min),
    "medusa": _medusa,
}


def register_proposer(method: str, factory: ProposerFactory) -> None:
    """Make `factory(config, model)` the proposer of `speculative_config={"method": method}`."""
    _PROPOSERS[method] = factory


def make_proposer(config: SpeculativeConfig, model: Any) -> Proposer:
    """The proposer the config names, for the target `model`."""
    if config.method not in _PROPOSERS:
        raise ValueError(
            f"speculative_config method={config.method!r} is not a proposer; accepted: "
            f"{', '.join(sorted(_PROPOSERS))}"
        )
    return _PROPOSERS[config.method](config, model)


PROBE_EVERY = 16  # steps between retries of a sequence whose guesses were not worth it
EMA = 0.3  # weight of the newest verification in a sequence's acceptance estimate


class Speculator:
    """Each step: who speculates. At most `disable_by_batch_size` decoding sequences, all of
    them; beyond that (a busy batch, where verifying guesses slows every step), nobody, or with
    `min_acceptance` only those whose own recent guesses were mostly kept: each sequence's
    acceptance rate is tracked (an exponential average over its verifications, starting
    optimistic, so every sequence is tried once), and one that falls below is retried every
    PROBE_EVERY steps."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, model: Any) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = make_proposer(config, model)
        self._rate: dict[int, float] = {}  # seq_id -> recent acceptance rate
        self._idle: dict[int, int] = {}  # seq_id -> steps since it last speculated

    def room(self, seq: Sequence) -> int:
        """Guesses `seq` may take: the verified step also yields one token of its own, and
        every guessed position must fit in the context."""
        k = min(self.config.num_speculative_tokens, self.max_model_len - seq.num_tokens)
        max_tokens = seq.sampling_params.max_tokens
        if max_tokens is not None:
            k = min(k, max_tokens - len(seq.output_token_ids) - 1)
        return max(k, 0)

    def propose(self, running: list[Sequence]) -> None:
        """Set `spec_tokens` of the decoding sequences among `running` (sampling requests
        only), or clear them all when the batch is too large to gain."""
        for seq in running:
            seq.spec_tokens = []
            self._learn(seq)
        decoding = [s for s in running if s.num_computed_tokens == s.num_tokens - 1]
        limit = self.config.disable_by_batch_size
        if limit is not None and len(decoding) > limit:
            decoding = [s for s in decoding if self._worth_it(s)]
        live = {s.seq_id for s in running}
        for table in (self._rate, self._idle):
            for seq_id in [i for i in table if i not in live]:
                del table[seq_id]
        if not decoding:
            return
        room = [self.room(s) for s in decoding]
        for seq, k, guess in zip(decoding, room, self.proposer.propose(decoding, room)):
            seq.spec_tokens = list(guess[:k])
            if seq.spec_tokens:
                self._idle[seq.seq_id] = 0

    def _learn(self, seq: Sequence) -> None:
        """Fold the sequence's last verification (if any) into its acceptance rate."""
        self._idle[seq.seq_id] = self._idle.get(seq.seq_id, 0) + 1
        if seq.spec_result is None:
            return
        proposed, kept = seq.spec_result
        seq.spec_result = None
        if proposed:
            old = self._rate.get(seq.seq_id, 1.0)
            self._rate[seq.seq_id] = (1 - EMA) * old + EMA * kept / proposed

    def _worth_it(self, seq: Sequence) -> bool:
        """Under load: whether `seq` speculates this step."""
        floor = self.config.min_acceptance
        if floor is None:
            return False
        return (
            self._rate.get(seq.seq_id, 1.0) >= floor or self._idle.get(seq.seq_id, 0) >= PROBE_EVERY
        )
