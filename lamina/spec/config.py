"""What speculation the engine does (vLLM's `speculative_config` names)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: the proposer ("ngram": prompt lookup, continue the latest earlier occurrence of
        the output's last n-gram in prompt + output; others register in spec/speculator.py).
    model: what the proposer loads ("medusa": the folder `lamina train-heads` wrote).
    num_speculative_tokens: tokens proposed per sequence and step (k); the target verifies
        k + 1 positions in one pass.
    prompt_lookup_max / prompt_lookup_min: the longest and shortest n-gram tried (longest
        first; a single token recurs too often by chance to be worth verifying).
    disable_by_batch_size: in a step where more sequences than this decode (a busy batch,
        where verifying guesses slows every step), only sequences whose recent guesses were
        mostly kept speculate; None: every sequence always speculates.
    min_acceptance: under that load, the recent acceptance rate a sequence needs to go on
        speculating (spec/speculator.py); None (the default): nobody speculates under load.
        Off by default: on the measured CPU one verifying sequence slows the whole batch's
        step, so even copying outputs lost at batch 16 (benchmarks/results/README.md).
    """

    method: str = "ngram"
    model: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    disable_by_batch_size: int | None = 2
    min_acceptance: float | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"speculative_config {name}={v!r} is invalid; it must be an integer >= 1"
                )

        if not isinstance(self.method, str) or not self.method:
            raise ValueError(
                f"speculative_config method={self.method!r} is invalid; give a proposer name "
                "such as 'ngram'"
            )
        if self.method == "medusa" and not self.model:
            raise ValueError(
                'speculative_config method "medusa" needs "model": the folder of trained heads '
                "(lamina train-heads --kind medusa)"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            positive(name)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config prompt_lookup_min={self.prompt_lookup_min} is larger than "
                f"prompt_lookup_max={self.prompt_lookup_max}"
            )
        if self.disable_by_batch_size is not None:
            positive("disable_by_batch_size")
        if self.min_acceptance is not None and (
            isinstance(self.min_acceptance, bool)
            or not isinstance(self.min_acceptance, (int, float))
            or not 0 <= self.min_acceptance <= 1
        ):
            raise ValueError(
                f"speculative_config min_acceptance={self.min_acceptance!r} is invalid; it must be "
                "in [0, 1] or None"
            )

    @classmethod
    def from_value(
        cls, value: SpeculativeConfig | dict[str, Any] | str | None
    ) -> SpeculativeConfig | None:
        """From itself, a dict of its fields, or that dict as JSON (the CLI flag); None: off."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"speculative_config is not valid JSON ({e}); give e.g. "
                    '\'{"method": "ngram", "num_speculative_tokens": 4}\''
                ) from e
        if not isinstance(value, dict):
            raise ValueError(
                f"speculative_config={value!r} is invalid; give a dict such as "
                '{"method": "ngram", "num_speculative_tokens": 4}'
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config has unknown keys {unknown}; accepted: {sorted(known)}"
            )
        return cls(**value)
