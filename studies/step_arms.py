"""Timing arms of one training step against each other in one process: warm-up, then the arms
step by step in turn (so that all see the same machine state), the median of each."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from bertpre.perf.bench import _sync


def time_alternating(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                     count: int) -> dict[str, float]:
    """Median ms/step of each arm: ``warmup`` untimed steps of each, then ``count`` rounds in
    which every arm runs one timed step."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}
