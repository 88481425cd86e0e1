"""Timing arms of one training step against each other in one process: warm-up, then the arms
step by step in turn (so that all see the same machine state), the median of each."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bertpre.perf.bench import BenchOptions, _sync, machine_description


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


def add_timing_arguments(p: argparse.ArgumentParser) -> None:
    """The options every arms study takes: steps, warm-up, precision, device, output folder."""
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", type=Path, help="write results.json here")


def write_results(args: argparse.Namespace, rows: list[dict]) -> None:
    """results.json in ``args.output`` (if given): the machine, the options and the rows."""
    if not args.output:
        return
    result = {"machine": machine_description(BenchOptions(device=args.device).resolved_device()),
              "options": {k: v for k, v in vars(args).items() if k != "output"}, "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
