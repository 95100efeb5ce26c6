"""From one step's hidden states to what each request gets: sampled tokens, prompt logprobs,
beam steps, scored positions; then detokenizing, stop checks and finishing.

The work is planned in two halves around the one vocabulary GEMM of the step: `plan` lists the
hidden rows whose logits are needed (each request kind picks its own: a sampling sequence its
last row, a prompt-logprobs request every prompt row, a beam its last row, a scoring request
none), the engine computes those logits at once, and `process` hands each kind its rows.
Sampling stays batched across requests (one Sampler call per step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from lamina.engine.request import Request
from lamina.engine.sampler import Sampler, SampleResult
from lamina.engine.scheduler import Scheduler, SchedulerOutput
from lamina.engine.sequence import Sequence, make_generator
from lamina.engine.stats import SpecStats
from lamina.kv.block_manager import BlockManager
from lamina.outputs import RequestOutput


@dataclass
class StepPlan:
    """Rows of the step's hidden states that need logits, and who reads which."""

    rows: list[int] = field(default_factory=list)
    sample: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, logits index)
    # sequences with guessed tokens: logits indices of their last known token and each guess
    verify: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[Sequence, int, int]] = field(default_factory=list)  # + target
    beams: list[tuple[Sequence, int]] = field(default_factory=list)
    scored: list[tuple[Request, int, int, int]] = field(default_factory=list)  # first, row, n

    def want(self, row: int) -> int:
        """Ask for the logits of hidden row `row`; returns its index in the logits."""
        self.rows.append(row)
        return len(self.rows) - 1


# (plan, request, sequence, first position fed, tokens fed, its first row in the batch)
Planner = Callable[[StepPlan, Request, Sequence, int, int, int], None]


class OutputProcessor:
    def __init__(
        self,
        requests: dict[str, Request],
        scheduler: Scheduler,
        sampler: Sampler,
        eos_token_ids: Collection[int],
        max_model_len: int,
    ) -> None:
        self.requests = requests
        self.scheduler = scheduler
        self.blocks: BlockManager = scheduler.blocks
        self.sampler = sampler
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.generation_tokens = 0
        self.spec_stats = SpecStats()
        # keep each sampling sequence's last hidden state (a proposer reads it: Medusa)
        self.keep_hidden = False
        self._hidden: tuple[torch.Tensor, list[int]] | None = None  # this step's, and rows
        # request kind -> which hidden rows it needs logits for (see engine/request.py)
        self._planners: dict[str, Planner] = {
            "sample": self._plan_sample,
            "beam": self._plan_beam,
            "score": self._plan_score,
        }

    # ---- planning ------------------------------------------------------------------------
    def plan(
        self, batch: SchedulerOutput, starts: list[int], scheduled_at: float | None = None
    ) -> StepPlan:
        """`scheduled_at`: when the batch was scheduled (monotonic), the first_scheduled_time
        of requests it computes for the first time."""
        plan = StepPlan()
        when = time.monotonic() if scheduled_at is None else scheduled_at
        for seq, n, start in zip(batch.seqs, batch.num_new_tokens, starts):
            req = self.requests[seq.request_id]
            if req.first_scheduled_time is None:
                req.first_scheduled_time = when
            self._planners[req.kind](plan, req, seq, seq.num_computed_tokens, n, start)
        return plan

    def _plan_sample(
        self, plan: StepPlan, req: Request, seq: Sequence, first: int, n: int, start: int
    ) -> None:
        k = len(seq.spec_tokens)
        if k and first + n == seq.num_tokens + k:
            last = start + n - 1 - k  # the row of the last known token
            plan.verify.append((seq, [plan.want(last + j) for j in range(k + 1)]))
        elif first + n == seq.num_tokens:
            plan.sample.append((seq, plan.want(start + n - 1)))
        if req.prompt_logprobs is None or seq.index != 0:
            return
        # positions already recorded (before a preemption made the sequence recompute) are
        # not recorded again
        done = len(req.prompt_logprobs) - 1
        for p in range(max(first, done), min(first + n, seq.num_prompt_tokens - 1)):
            target = seq.prompt_token_ids[p + 1]
            plan.prompt_logprobs.append((seq, plan.want(start + p - first), target))

    def _plan_beam(
        self, plan: StepPlan, req: Request, seq: Sequence, first: int, n: int, start: int
    ) -> None:
        if first + n == seq.num_tokens:
            plan.beams.append((seq, plan.want(start + n - 1)))

    def _plan_score(
        self, plan: StepPlan, req: Request, seq: Sequence, first: int, n: int, start: int
    ) -> None:
        plan.scored.append((req, first, start, n))

    # ---- processing ----------------------------------------------------------------------
    def process(
        self, plan: StepPlan, logits: torch.Tensor, hidden: torch.Tensor
    ) -> list[RequestOutput]:
        """Apply one step's logits (rows as planned) and return the outputs of the requests
        that advanced; finished requests are forgotten."""
        touched: dict[str, None] = {}
        self._hidden = (hidden, plan.rows) if self.keep_hidden else None
        self._record_prompt_logprobs(plan.prompt_logprobs, logits)
        for rid in self._sample(plan.sample, logits):
            touched[rid] = None
        self._verify(plan.verify, logits, touched)
        for rid in self._beam_steps(plan.beams, logits):
            touched[rid] = None
        for rid in self._score(plan.scored, hidden):
            touched[rid] = None
        outputs = []
        now = time.monotonic()
        for rid in touched:
            req = self.requests[rid]
            if req.finished:
                req.finished_time = now
            outputs.append(req.output())
            if req.finished:
                del self.requests[rid]
        return outputs

    def _record_prompt_logprobs(
        self, rows: list[tuple[Sequence, int, int]], logits: torch.Tensor
    ) -> None:
        if not rows:
            return
        logprobs = logits[torch.tensor([i for _, i, _ in rows])].log_softmax(dim=-1)
        targets = torch.tensor([t for _, _, t in rows])
        chosen = logprobs.gather(1, targets.unsqueeze(1))
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        for j, (seq, _, target) in enumerate(rows):
            req = self.requests[seq.request_id]
            k = req.params.prompt_logprobs or 0
            top_v, top_i = logprobs[j].topk(k) if k else (torch.empty(0), torch.empty(0))
            assert req.prompt_logprobs is not None
            req.prompt_logprobs.append(
                req.logprob_entry(
                    target, float(chosen[j]), ranks[j], list(zip(top_i.tolist(), top_v.tolist()))
                )
            )

    # ---- sampling ------------------------------------------------------------------------
    def _sample(self, rows: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[str]:
        picks: list[int] = []
        seqs: list[Sequence] = []
        for seq, i in rows:
            req = self.requests[seq.request_id]
            family = [seq]
            if not req.forked:  # prompt done: split off the other best_of - 1 samples
                req.forked = True
                family += self._fork_samples(req, seq)
            picks += [i] * len(family)
            seqs += family
        if not seqs:
            return []
        results = self.sampler(logits[torch.tensor(picks)], seqs)
        now = time.monotonic()
        touched: dict[str, None] = {}
        for seq, res in zip(seqs, results):
            req = self.requests[seq.request_id]
            if req.first_token_time is None:
                req.first_token_time = now
            if seq.request_id not in touched:
                req.token_times.append(now)
            self._append(seq, req, res)
            touched[seq.request_id] = None
        for seq, pick in zip(seqs, picks):
            self._keep_hidden(seq, pick)
        self.sampler.prepare([s for s in seqs if not s.is_finished])
        return list(touched)

    def _verify(
        self, rows: list[tuple[Sequence, list[int]]], logits: torch.Tensor, touched: dict[str, None]
    ) -> None:
        """Speculative verification, position by position: each sequence samples its next
        token from the logits after its last known token, exactly as without speculation
        (the same processors, penalties, grammar and random stream); if that token is its first
        guess, the guess's logits (computed in the same pass) give the token after it, and so
        on, until a sample differs from the guess, the guesses run out (the last row gives one
        more token), or the sequence finishes. Every kept token is a sample of the target's
        distribution at its position, for greedy and sampling alike (a guess is a point-mass
        proposal: kept with probability p(guess), else the sample is p restricted to the other
        tokens, as Leviathan et al.'s rule gives)."""
        if not rows:
            return
        now = time.monotonic()
        for seq, _ in rows:
            if seq.request_id not in touched:
                self.requests[seq.request_id].token_times.append(now)
                touched[seq.request_id] = None
        active = [(seq, idx, list(seq.spec_tokens)) for seq, idx in rows]
        kept = dict.fromkeys((seq.seq_id for seq, _ in rows), 0)
        j = 0
        while active:
            results = self.sampler(
                logits[torch.tensor([idx[j] for _, idx, _ in active])], [s for s, _, _ in active]
            )
            still = []
            for (seq, idx, guesses), res in zip(active, results):
                self._append(seq, self.requests[seq.request_id], res)
                self._keep_hidden(seq, idx[j])
                if j < len(guesses) and res.token == guesses[j] and not seq.is_finished:
                    kept[seq.seq_id] += 1
                    still.append((seq, idx, guesses))
            active, j = still, j + 1
        for seq, _ in rows:
            self.spec_stats.record(len(seq.spec_tokens), kept[seq.seq_id])
            seq.spec_result = (len(seq.spec_tokens), kept[seq.seq_id])
            if seq.is_finished:
                seq.spec_tokens.clear()
            else:
                self.scheduler.settle_guesses(seq, kept[seq.seq_id])
        self.sampler.prepare([s for s, _ in rows if not s.is_finished])

    def _keep_hidden(self, seq: Sequence, logits_index: int) -> None:
        """Remember the hidden state whose logits gave `seq` its newest token."""
        if self._hidden is not None and not seq.is_finished:
            hidden, rows = self._hidden
            seq.last_hidden = hidden[rows[logits_index]].clone()  # not a view of the step's

    def _fork_samples(self, req: Request, seq: Sequence) -> list[Sequence]:
        children = []
        for idx in range(1, req.params.best_of or 1):
            child = seq.fork(idx, self.blocks.fork(seq.block_table))
            child.generator = make_generator(req.seed, idx)
            req.add_seq(child)
            self.scheduler.add_running(child)
            children.append(child)
        return children

    def _append(self, seq: Sequence, req: Request, res: SampleResult) -> None:
        seq.append_token(res.token)
        seq.cumulative_logprob += res.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(req.logprob_entry(res.token, res.logprob, res.rank, res.top))
        self.generation_tokens += 1
        self._check_stop(seq, req, res.token)
        reason = None if seq.is_finished else self.sampler.accept(seq, res.token)
        if reason is not None:  # a constraint is complete, or broke (guided decoding)
            seq.finish(reason)
            seq.text += req.detokenizers[seq.seq_id].flush().rstrip("\ufffd")
        if seq.is_finished:
            self.scheduler.finish(seq)

    def _check_stop(self, seq: Sequence, req: Request, token: int) -> None:
        params = seq.sampling_params
        detok = req.detokenizers[seq.seq_id]
        new_text = detok.add(token)
        # (the sampler never picks EOS / stop ids before min_tokens)
        if token in (params.stop_token_ids or ()):
            seq.finish("stop", token)
        elif token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("stop", None)
        if seq.is_finished:
            # the stop token's own text is part of the output only if asked (vLLM); it is
            # empty anyway for a special token when skip_special_tokens is set
            if params.include_stop_str_in_output:
                seq.text += new_text + detok.flush().rstrip("\ufffd")
            return
        before = len(seq.text)
        seq.text += new_text
        if len(seq.output_token_ids) >= params.min_tokens:
            for stop in params.stop_strings:
                at = seq.text.find(stop, max(0, before - len(stop) + 1))
                if at != -1:
                    # cut before the stop string, or (include_stop_str_in_output) after it
                    end = at + len(stop) if params.include_stop_str_in_output else at
                    seq.text = seq.text[:end]
                    seq.finish("stop", stop)
                    return
        if (
            params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens
        ) or seq.num_tokens >= self.max_model_len:
            seq.finish("length")
        if seq.is_finished:
            # A character cut off by the token limit is dropped, not shown as U+FFFD.
            seq.text += detok.flush().rstrip("\ufffd")

    # ---- beam search ---------------------------------------------------------------------
    def _beam_steps(self, rows: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[str]:
        """Store each reporting beam's log-probabilities; step every beam group whose live
        beams have all reported (a preempted beam catches up in a later step)."""
        touched: dict[str, None] = {}
        for seq, i in rows:
            seq.beam_logprobs = logits[i].log_softmax(dim=-1)
            req = self.requests[seq.request_id]
            if all(s.beam_logprobs is not None for s in req.seqs):
                self._beam_step(req)
                touched[req.request_id] = None
        return list(touched)

    def _beam_step(self, req: Request) -> None:
        group = req.beam
        assert group is not None
        beams = list(req.seqs)
        logprobs = torch.stack([s.beam_logprobs for s in beams])  # type: ignore[misc]
        step = group.step([s.output_token_ids for s in beams], logprobs)
        children = [] if step.done else [self._fork_beam(beams[p], t) for p, t, _ in step.survivors]
        for seq in beams:  # parents give their blocks back after the children took theirs
            seq.finish("stop" if step.done else "beam")
            self.scheduler.finish(seq)
        if step.done:
            return
        req.seqs = children
        for child in children:
            self.scheduler.add_running(child)

    def _fork_beam(self, parent: Sequence, token: int) -> Sequence:
        child = parent.fork(0, self.blocks.fork(parent.block_table))
        child.append_token(token)
        return child

    # ---- prompt scoring ------------------------------------------------------------------
    def _score(self, rows: list[tuple[Request, int, int, int]], hidden: torch.Tensor) -> list[str]:
        """Hand each scoring request the hidden states of its newly computed positions (not
        again after a preemption), and finish it once its whole prompt is computed."""
        touched = []
        for req, first, start, n in rows:
            skip = max(0, req.num_scored - first)
            if skip < n and req.on_hidden is not None:
                req.on_hidden(first + skip, hidden[start + skip : start + n])
            req.num_scored = max(req.num_scored, first + n)
            seq = req.seqs[0]
            if seq.num_computed_tokens == seq.num_tokens:
                seq.finish("length")
                self.scheduler.finish(seq)
            touched.append(req.request_id)
        return touched
