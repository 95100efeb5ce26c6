"""The serving loop: sequences, scheduler, model runner, sampler, engine."""
