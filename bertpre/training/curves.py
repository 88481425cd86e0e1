"""A run's curves in one picture: written at the end of every ``bertpre train`` / ``finetune`` run
beside its ``metrics.csv``, and on demand by ``bertpre curves RUN``.

Panels, each drawn when the run logged its metrics: the training (and validation) loss; the
validation MLM accuracy with the two lines that say whether it means anything, always predicting
the most frequent masked token (majority) and the model's accuracy with its context replaced by
random tokens; the context gain (their difference, the MLM plateau metric, with the warning's
threshold); the learning rate. A fine-tuning run draws its validation accuracy instead.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from bertpre.errors import UserError
from bertpre.outputs import atomic_write

FILE_NAME = "curves.png"


def find_metrics(path: str | Path) -> Path:
    """The ``metrics.csv`` that ``path`` names: the file itself, a log folder holding it, or a run
    folder (``trainer.default_root_dir``), whose newest ``logs/version_N`` is taken."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    versions = [p for p in (path / "logs").glob("version_*") if (p / "metrics.csv").is_file()]
    if not versions:
        raise UserError(f"{path}: no metrics.csv (give a run folder, one of its logs/version_N folders or the file)")
    return max(versions, key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1) \
        / "metrics.csv"


def read_series(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """Every column of a Lightning CSV log as (step, value) points, empty cells skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    try:
        with open(metrics, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for name, cell in row.items():
                    if name in ("step", "epoch") or not cell:
                        continue
                    try:
                        value = float(cell)
                    except ValueError:
                        raise UserError(f"{metrics}: column {name} holds {cell!r}, not a number") from None
                    if math.isfinite(value):
                        series.setdefault(name, []).append((int(float(step)), value))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{metrics}: cannot read ({e})") from None
    return series


def plot_curves(path: str | Path, output: str | Path | None = None, threshold: float | None = None) -> Path:
    """Draw the curves of the run at ``path`` (see ``find_metrics``) into ``output`` (default:
    ``curves.png`` beside ``metrics.csv``) and return where. ``threshold``: the plateau warning's
    minimum context gain, drawn on the gain panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = find_metrics(path)
    series = read_series(metrics)
    out = Path(output) if output is not None else metrics.parent / FILE_NAME
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--output {out}: not an image file name (use .png, .pdf or .svg)")
    panels = [p for p in (_loss, _accuracy, _gain, _lr) if p(None, series, threshold)]
    if not panels:
        raise UserError(f"{metrics}: no loss, accuracy or learning-rate column to draw")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for panel, ax in zip(panels, axes[0]):
        panel(ax, series, threshold)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(metrics.parent))
    fig.tight_layout()
    try:
        atomic_write(out, lambda f: fig.savefig(f, dpi=90, format=out.suffix.lstrip(".").lower()), what=str(out))
    finally:
        plt.close(fig)
    return out


def _draw(ax, series, name, label, **style) -> bool:
    points = series.get(name)
    if points and ax is not None:
        ax.plot(*zip(*points), label=label, **style)
    return bool(points)


def _loss(ax, series, threshold) -> bool:
    if ax is None:
        return "train/loss" in series or "val/loss" in series
    _draw(ax, series, "train/loss", "train")
    _draw(ax, series, "val/loss", "validation", marker="o", markersize=3)
    ax.set(title="loss")
    ax.legend()
    return True


def _accuracy(ax, series, threshold) -> bool:
    name = "val/mlm_accuracy" if "val/mlm_accuracy" in series else "val/accuracy"
    if ax is None:
        return name in series
    _draw(ax, series, name, "validation", marker="o", markersize=3)
    _draw(ax, series, "val/mlm_random_context_accuracy", "random context", linestyle="--")
    _draw(ax, series, "val/mlm_majority_accuracy", "majority token", linestyle=":", color="gray")
    _draw(ax, series, "val/majority_accuracy", "majority label", linestyle=":", color="gray")
    ax.set(title="validation MLM accuracy" if name == "val/mlm_accuracy" else "validation accuracy")
    ax.legend()
    return True


def _gain(ax, series, threshold) -> bool:
    if ax is None:
        return "val/mlm_context_gain" in series
    _draw(ax, series, "val/mlm_context_gain", "context gain", marker="o", markersize=3)
    if threshold is not None:
        ax.axhline(threshold, linestyle=":", color="gray", label=f"plateau warning below {threshold:g}")
    ax.set(title="MLM context gain (accuracy - random context)")
    ax.legend()
    return True


def _lr(ax, series, threshold) -> bool:
    if ax is None:
        return "train/lr" in series
    _draw(ax, series, "train/lr", "learning rate")
    ax.set(title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return True
