"""SamplingParams: how to pick each next token and when to stop. Names follow vLLM/OpenAI.

Every field is validated here, once, with an error that names the field and the accepted range,
so nothing invalid reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Decoding settings of one request.

    temperature: 0 means greedy; otherwise logits are divided by it before softmax.
    top_k: keep the k most likely tokens (0 or -1: all).
    top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: all).
    max_tokens: the most tokens to generate (None: until the context is full).
    stop: strings that end generation; they are cut out of the returned text (as OpenAI does).
    stop_token_ids: token ids that end generation (kept in token_ids, not in the text).
    ignore_eos: keep generating past the end-of-sequence token.
    seed: makes sampling reproducible for this request, whatever else is in the batch.
    skip_special_tokens: drop special tokens from the returned text.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    n: int = 1
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k in (None, -1):
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is invalid; {accepted}")

        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "it must be a number >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "it must be an integer >= 1, or 0 / -1 to disable")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "it must be in (0, 1]")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", "it must be an integer >= 1 or None")
        if self.n != 1:
            raise bad("n", "only n=1 is supported so far")
        if any(not isinstance(s, str) or not s for s in self._stop_list):
            raise bad("stop", "it must be a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            raise bad("stop_token_ids", "it must be a list of token ids >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "it must be an integer or None")

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
