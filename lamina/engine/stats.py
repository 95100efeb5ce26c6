"""Engine statistics: per-step gauges and cumulative counters, read by the CLI, the progress bar,
benchmarks and the server's /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from lamina.engine.scheduler import Scheduler, SchedulerOutput


@dataclass
class StepStats:
    """What the last step did and left."""

    num_running: int = 0
    num_waiting: int = 0
    num_batched_tokens: int = 0
    num_prefill_seqs: int = 0
    num_decode_seqs: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    step_seconds: float = 0.0
    forward_seconds: float = 0.0


@dataclass
class SpecStats:
    """Speculative decoding: guesses made and kept, in all and by position."""

    num_drafts: int = 0  # sequence-steps that verified guesses
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_at: list[int] = field(default_factory=list)  # [i]: drafts whose guess i was kept
    proposed_at: list[int] = field(default_factory=list)  # [i]: drafts that had a guess i

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for counts, upto in ((self.proposed_at, proposed), (self.accepted_at, accepted)):
            counts.extend([0] * (upto - len(counts)))
            for i in range(upto):
                counts[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying sequence gains per step: accepted guesses plus its own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def acceptance_by_position(self) -> list[float]:
        return [a / p for a, p in zip(self.accepted_at, self.proposed_at)]


@dataclass
class EngineStats:
    num_steps: int = 0
    prompt_tokens_computed: int = 0  # prefill actually run (cached prefixes excluded)
    generation_tokens: int = 0
    step_seconds: float = 0.0
    forward_seconds: float = 0.0  # model forward + logits
    last: StepStats = field(default_factory=StepStats)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    spec: SpecStats = field(default_factory=SpecStats)  # the output processor's, shared

    @property
    def overhead_seconds(self) -> float:
        """Python time per engine step outside the model: scheduling, sampling, detokenizing."""
        return self.step_seconds - self.forward_seconds

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0

    def record_step(
        self,
        sched: Scheduler,
        generation_tokens: int,
        batch: SchedulerOutput,
        seconds: float,
        forward_seconds: float,
    ) -> None:
        """Fold one step into the counters (the scheduler's are cumulative: copied)."""
        self.num_steps += 1
        self.generation_tokens = generation_tokens
        self.prompt_tokens_computed = sched.stats.prompt_tokens_computed
        self.step_seconds += seconds
        self.forward_seconds += forward_seconds
        self.prefix_cache_queries = sched.stats.prefix_cache_queries
        self.prefix_cache_hits = sched.stats.prefix_cache_hits
        self.num_preemptions = sched.stats.num_preemptions
        decodes = sum(1 for n, g in zip(batch.num_new_tokens, batch.num_guesses) if n - g == 1)
        self.last = StepStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_batched_tokens=sum(batch.num_new_tokens),
            num_prefill_seqs=len(batch) - decodes,
            num_decode_seqs=decodes,
            kv_blocks_used=sched.blocks.num_used_blocks,
            kv_blocks_free=sched.blocks.num_free_blocks,
            step_seconds=seconds,
            forward_seconds=forward_seconds,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "num_steps": self.num_steps,
            "prompt_tokens_computed": self.prompt_tokens_computed,
            "generation_tokens": self.generation_tokens,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
            "num_preemptions": self.num_preemptions,
            "spec_draft_tokens": self.spec.num_draft_tokens,
            "spec_accepted_tokens": self.spec.num_accepted_tokens,
            "spec_acceptance_rate": self.spec.acceptance_rate,
            "spec_mean_accepted_length": self.spec.mean_accepted_length,
            "mean_step_ms": 1e3 * self.step_seconds / max(self.num_steps, 1),
            "mean_overhead_ms": 1e3 * self.overhead_seconds / max(self.num_steps, 1),
            **{f"last_{k}": v for k, v in self.last.__dict__.items()},
        }
