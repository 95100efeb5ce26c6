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
        decodes = sum(1 for n in batch.num_new_tokens if n == 1)
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
            "mean_step_ms": 1e3 * self.step_seconds / max(self.num_steps, 1),
            "mean_overhead_ms": 1e3 * self.overhead_seconds / max(self.num_steps, 1),
            **{f"last_{k}": v for k, v in self.last.__dict__.items()},
        }
