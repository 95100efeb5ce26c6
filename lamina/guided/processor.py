"""The grammar's logits processor: constrained rows get their grammar's token mask, all rows
in one batched operation, and each generated token advances the sequence's matcher.

Where a core is free of torch's threads, masks for the next step are computed while the model
runs: after a step, `prepare` hands the continuing constrained sequences to a worker thread
(the grammar engine releases the GIL), and the next sampler call takes the masks that are
still current (the sequence has not grown since) and computes only the rest on the spot.
Otherwise every mask is computed in the sampler call (all rows at once, by the backend).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from lamina.cpu import usable_cores
from lamina.engine.logits_processors import LogitsProcessor
from lamina.engine.sequence import Sequence
from lamina.guided.backend import GrammarBackend, bitmask_words

log = logging.getLogger(__name__)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size] from int32 [rows, words]: bit i of word w is token 32 w + i
    (little-endian words, so numpy's little-endian bit order over their bytes is token order)."""
    raw = bitmask.contiguous().numpy().view(np.uint8)
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits).view(torch.bool)


def free_core() -> bool:
    """Whether this process may use more cores than torch's threads take."""
    return usable_cores() > torch.get_num_threads()


class GrammarProcessor(LogitsProcessor):
    hard = True

    def __init__(
        self, backend: Callable[[], GrammarBackend], vocab_size: int, ahead: bool | None = None
    ) -> None:
        """`backend` returns the engine's grammar backend (made on first use). `ahead`: compute
        next step's masks while the model runs; by default only when a core is left over from
        torch's threads (`free_core`): on a machine whose every core runs the model, the mask
        thread would stall torch's parallel regions and cost more than it saves."""
        self.ahead = free_core() if ahead is None else ahead
        self.backend = backend
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self._pool: ThreadPoolExecutor | None = None
        # the masks being computed ahead: future of [rows, words], and seq_id -> (row, length)
        self._ahead: tuple[Future[torch.Tensor], dict[int, tuple[int, int]]] | None = None
        self.masks_ahead = 0  # masks used from the ahead computation (stats / tests)
        self.masks_now = 0  # masks computed inside the sampler call

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return logits
        masks = self._masks([seqs[i] for i in rows])
        allowed = unpack_bitmask(masks, logits.shape[-1])
        if len(rows) == len(seqs):  # every row constrained: one op, no copy of the rest
            return logits.masked_fill(~allowed, float("-inf"))
        index = torch.tensor(rows)
        out = logits.clone()
        out[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return out

    def _masks(self, seqs: list[Sequence]) -> torch.Tensor:
        ready: torch.Tensor | None = None
        where: dict[int, tuple[int, int]] = {}
        if self._ahead is not None:
            future, where = self._ahead
            ready = future.result()
            self._ahead = None
        out = torch.empty(len(seqs), self.words, dtype=torch.int32)
        missing: list[int] = []
        for j, seq in enumerate(seqs):
            row, length = where.get(seq.seq_id, (-1, -1))
            if ready is not None and row >= 0 and length == seq.num_tokens:
                out[j] = ready[row]
            else:
                missing.append(j)
        self.masks_ahead += len(seqs) - len(missing)
        self.masks_now += len(missing)
        if missing:
            now = torch.empty(len(missing), self.words, dtype=torch.int32)
            self.backend().fill_masks([seqs[j].grammar for j in missing], now)  # type: ignore[misc]
            out[torch.tensor(missing)] = now
        return out

    def accept(self, seq: Sequence, token: int) -> str | None:
        matcher = seq.grammar
        if matcher is None:
            return None
        self.wait()  # a mask being computed ahead may still read this matcher
        accepted = matcher.consume(token)
        error = matcher.error()
        if error is not None or not accepted:
            # a grammar-engine limit hit, or (never sampled) a token outside the grammar: the
            # output is cut short, which "stop" would hide
            log.warning("request %s: guided decoding failed: %s", seq.request_id, error)
            return "abort"
        return "stop" if matcher.is_finished() else None

    def prepare(self, seqs: list[Sequence]) -> None:
        todo = [s for s in seqs if s.grammar is not None and not s.is_finished]
        self.wait()
        if not todo or not self.ahead:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lamina-grammar")
        matchers = [s.grammar for s in todo]
        backend = self.backend()

        def fill() -> torch.Tensor:
            masks = torch.empty(len(matchers), self.words, dtype=torch.int32)
            backend.fill_masks(matchers, masks)  # type: ignore[arg-type]
            return masks

        where = {s.seq_id: (i, s.num_tokens) for i, s in enumerate(todo)}
        self._ahead = (self._pool.submit(fill), where)

    def wait(self) -> None:
        """Let a mask computation ahead finish (its result stays for the next call)."""
        if self._ahead is not None:
            self._ahead[0].result()
