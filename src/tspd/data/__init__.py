"""Data sources: callables `source(step) -> batch`, deterministic in (seed, step)."""
