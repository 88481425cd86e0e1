"""What ``bertpre gpu-check`` reads and prints: its runs' logged metrics (tokens/s, MFU, peak
memory, losses), kernel timings between device syncs, and the table of results."""

from __future__ import annotations

import csv
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_ms(step: Callable[[], None], device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``step`` after ``warmup`` calls, each timed between device syncs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return round(statistics.median(times), 3)


def read_metrics_versions(run: Path) -> list[list[dict]]:
    """The rows of each logs/version_N/metrics.csv of a run folder (one per process that trained it)."""
    files = sorted(run.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    versions = []
    for path in files:
        with open(path, newline="") as f:
            versions.append(list(csv.DictReader(f)))
    return versions


def read_metrics(run: Path) -> list[dict]:
    return [row for rows in read_metrics_versions(run) for row in rows]


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of ``key``, in logging order (a resumed run's after its first)."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def throughput(rows: list[dict]) -> dict:
    """Median of the logged windows: tokens/s, MFU, peak memory (the largest)."""
    out = {}
    for key, name in (("perf/tokens_per_sec", "tokens_per_sec"), ("perf/mfu", "mfu"),
                      ("perf/padding_share", "padding_share")):
        values = [v for _, v in series(rows, key)]
        if values:
            out[name] = round(statistics.median(values), 4 if name != "tokens_per_sec" else None)
    memory = [v for _, v in series(rows, "perf/peak_memory_gb")]
    if memory:
        out["peak_memory_gb"] = round(max(memory), 2)
    return out


def mean_of_quarter(losses: list[tuple[int, float]], last: bool) -> float:
    part = max(1, len(losses) // 4)
    values = [v for _, v in (losses[-part:] if last else losses[:part])]
    return sum(values) / len(values)


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr or done.stdout or "").strip().splitlines() if line.strip()]
    return f"exit status {done.returncode}: {lines[-1] if lines else 'no output'}"


def profile_figures(r: dict) -> str:
    """A profiled step in a line: its time, the device's busy share, the products' rate, the categories."""
    return (f"{r['wall_ms_per_step']} ms/step" + (f", busy {r['busy']:.0%}" if "busy" in r else "")
            + (f", matmul {r['matmul_tflops']} TFLOP/s" if "matmul_tflops" in r else "") + "; "
            + ", ".join(f"{c} {v:.0%}" for c, v in sorted(r["share"].items(), key=lambda kv: -kv[1])))


def format_table(results: dict) -> str:
    lines = []
    env = results["stages"].get("environment", {})
    lines.append(f"machine: {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, CUDA {env.get('cuda')}")
    lines.append(f"{'stage':<16}{'ok':<5}{'s':>7}  figures")
    for name, r in results["stages"].items():
        figures = []
        for key in ("tokens_per_sec", "mfu", "peak_memory_gb", "loss_first", "loss_last", "speedup_over_eager",
                    "compile_mode", "graph_breaks", "recompiles", "unexpected_recompiles", "max_relative_loss_difference",
                    "before_kill_max_relative_difference", "killed_at_step", "speedup",
                    "largest_batch", "val_mlm_accuracy", "val_mlm_context_gain", "steps", "error"):
            if key in r and r[key] is not None:
                value = r[key]
                figures.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        if name.startswith("bench") and "bertpre" in r:
            figures.append(f"bertpre {r['bertpre']['tokens_per_s']} tok/s, mfu {r['bertpre']['mfu']}, "
                           f"{r['bertpre']['peak_memory_mb']} MB; transformers {r['transformers']['tokens_per_s']} "
                           f"tok/s, {r['transformers']['peak_memory_mb']} MB")
        if name.startswith("profile") and "share" in r:
            figures.append(profile_figures(r) + ("; transformers: " + profile_figures(r["transformers"])
                                                 if "transformers" in r else ""))
        if name == "attention":
            timed = {**r.get("ms", {}), **r.get("projections_ms", {})}
            figures.append("; ".join(f"{k} {v}" for k, v in timed.items()))
        lines.append(f"{name:<16}{'yes' if r.get('ok') else 'NO':<5}{r.get('seconds', 0):>7}  {', '.join(figures)}")
    return "\n".join(lines)
