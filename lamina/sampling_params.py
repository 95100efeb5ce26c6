"""SamplingParams: how to pick each next token and when to stop. Names follow vLLM / OpenAI.

Every field is validated here, once, with an error that names the field and the accepted range,
so nothing invalid reaches the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lamina.guided.spec import GuidedDecoding

MAX_LOGPROBS = 20  # OpenAI's limit for top logprobs


def is_finite_number(v: object) -> bool:
    """An int or float that is finite: NaN and +-inf are refused (Python's json, and so a JSON
    request body, accepts the literals NaN and Infinity), as are ints too large for a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


@dataclass
class SamplingParams:
    """Decoding settings of one request.

    n: samples returned; best_of: samples generated (the n with the highest cumulative logprob
        are returned). The samples share the prompt's KV blocks.
    temperature: 0 means greedy; otherwise logits are divided by it before softmax.
    top_k: keep the k most likely tokens (0 or -1: all). top_p: keep the smallest set whose
        probability reaches top_p. min_p: drop tokens less likely than min_p x the top token.
    repetition_penalty: CTRL / transformers: a logit of a token seen in prompt or output is
        divided by it when positive, multiplied when negative (1: off).
    frequency_penalty, presence_penalty: OpenAI: logit -= frequency * count + presence * seen,
        over the generated tokens (0: off).
    logit_bias: token id -> value added to its logit (OpenAI, in [-100, 100]).
    max_tokens / min_tokens: most / fewest tokens to generate (EOS and stop ids are blocked
        until min_tokens). stop: strings that end generation, cut out of the text like OpenAI.
    stop_token_ids: ids that end generation. ignore_eos: keep going past EOS.
    include_stop_str_in_output: keep the stop string (or the stop token's text) that ended
        generation in the text, as vLLM does (by default it is cut out).
    bad_words: words that may not be generated (vLLM): each is tokenized as is and with a
        leading space; the last token of such a sequence is banned whenever the output ends
        with the tokens before it (a one-token word is banned outright).
    allowed_token_ids: only these ids may be generated (the others' logits become -inf).
    seed: reproducible sampling for this request, whatever else shares its batch. Each sample
        (n / best_of) draws from a stream seeded by a hash of (seed, sample index), so the
        samples of nearby seeds are unrelated (not shifted copies of each other).
    truncate_prompt_tokens: keep only the last k prompt tokens (vLLM), before the prompt is
        checked against the context.
    logprobs: also return the top-N logprobs of each generated token (plus the chosen one's).
    prompt_logprobs: return the top-N logprobs at each prompt position (plus the prompt token's).
    Logprobs are those of the model's distribution, before penalties and temperature.
    guided: constrain the output to a JSON schema, any JSON object, a regex, a choice of
        strings or a grammar (`GuidedDecoding`, or a dict of its fields such as
        `{"json": schema}`); generation stops when the constraint is complete.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    guided: GuidedDecoding | dict[str, Any] | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if self.best_of is None:
            self.best_of = self.n
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, OverflowError) as e:
                raise ValueError("logit_bias is invalid; it must map token ids to numbers") from e
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.guided is not None:
            self.guided = GuidedDecoding.from_value(self.guided)
        self.validate()

    def validate(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is invalid; {accepted}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return is_finite_number(v)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "it must be an integer >= 1")
        if self.best_of is None or not is_int(self.best_of) or self.best_of < self.n:
            raise bad("best_of", f"it must be an integer >= n ({self.n})")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "it must be a finite number >= 0 (0 means greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "it must be an integer >= 1, or 0 / -1 to disable")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "it must be in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "it must be in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "it must be a finite number > 0 (1 disables it)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "it must be in [-2, 2]")
        if any(
            not is_num(v) or not -100 <= v <= 100 or k < 0
            for k, v in (self.logit_bias or {}).items()
        ):
            raise bad("logit_bias", "token ids must be >= 0 and biases in [-100, 100]")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "it must be an integer >= 1 or None")
        if (
            not is_int(self.min_tokens)
            or self.min_tokens < 0
            or (self.max_tokens is not None and self.min_tokens > self.max_tokens)
        ):
            raise bad("min_tokens", "it must be an integer >= 0 and <= max_tokens")
        if any(not isinstance(s, str) or not s for s in self._stop_list):
            raise bad("stop", "it must be a non-empty string or a list of non-empty strings")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids or []):
            raise bad("stop_token_ids", "it must be a list of token ids >= 0")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "it must be an integer or None")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"it must be an integer in [0, {MAX_LOGPROBS}] or None")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad("include_stop_str_in_output", "it must be True or False")
        if self.bad_words is not None and any(
            not isinstance(w, str) or not w.strip() for w in self.bad_words
        ):
            raise bad("bad_words", "it must be a list of non-blank strings")
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids
            or any(not is_int(t) or t < 0 for t in self.allowed_token_ids)
        ):
            raise bad("allowed_token_ids", "it must be a non-empty list of token ids >= 0, or None")
        if self.truncate_prompt_tokens is not None and (
            not is_int(self.truncate_prompt_tokens) or self.truncate_prompt_tokens < 1
        ):
            raise bad("truncate_prompt_tokens", "it must be an integer >= 1 or None")

    @property
    def guided_decoding(self) -> GuidedDecoding | None:
        """`guided`, typed (it is always converted when the params are made)."""
        return self.guided if isinstance(self.guided, GuidedDecoding) else None

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@dataclass
class BeamSearchParams:
    """Beam search settings (transformers' `num_beams` semantics).

    beam_width: beams kept per step. length_penalty: a finished beam scores
    sum(logprobs) / length ** length_penalty. early_stopping: True stops once beam_width beams
    have finished; False stops when no running beam can beat the worst finished one (transformers'
    heuristic); "never" runs to max_tokens.
    """

    beam_width: int = 4
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not is_finite_number(self.length_penalty):
            raise ValueError(
                f"length_penalty={self.length_penalty!r} is invalid; it must be a finite number"
            )
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width={self.beam_width!r} is invalid; it must be >= 1")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid; it must be >= 1")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping={self.early_stopping!r} is invalid; use True, False or 'never'"
            )
