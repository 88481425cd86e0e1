"""The console of ``bertpre train`` and ``bertpre finetune``: one progress bar over optimizer
steps (step / total, loss, tokens/s, ETA; a ``trainer.max_time`` run shows its clock against the
budget), one line per validation, a one-line model summary,
and none of Lightning's advertisement tips.

Lightning's default bar counts batches per epoch, which for a step-based run shows
``Epoch 0/-2`` and restarts at every pass over the data; a pretraining run is measured in
steps, so this bar is too (it resumes at the resumed step).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm

# shown on the bar when logged, in this order, under these short names
BAR_METRICS = {"train/loss": "loss", "train/mlm_accuracy": "mlm_acc", "perf/tokens_per_sec": "tok/s",
               "perf/mfu": "mfu"}


def total_steps(trainer: L.Trainer) -> int | None:
    """Optimizer steps the run will take, or None when only a time budget bounds it."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # an unsized dataloader: no total to show
        return None
    return int(total) if total != float("inf") else None


def time_budget(trainer: L.Trainer) -> tuple[float, float] | None:
    """(seconds elapsed, seconds left) of a run bounded by trainer.max_time (Lightning's Timer), else None."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is None or timer.time_remaining() is None:
        return None
    return timer.time_elapsed(), timer.time_remaining()


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_value(name: str, value: float) -> str:
    if name == "perf/tokens_per_sec":
        return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"
    if name == "perf/mfu":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


class StepProgressBar(ProgressBar):
    """A tqdm bar over optimizer steps on rank 0; after each validation a line with its metrics."""

    def __init__(self, refresh_rate: int = 10, file=None) -> None:
        super().__init__()
        self.refresh_rate = max(1, refresh_rate)
        self.file = file
        self.bar: tqdm | None = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self.bar = tqdm(total=total_steps(trainer), initial=trainer.global_step, desc="train", unit="step",
                        dynamic_ncols=True, file=self.file or sys.stderr, smoothing=0.1, leave=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.bar
        if bar is None or trainer.global_step == bar.n:
            return  # a micro-batch within an accumulated step
        bar.n = trainer.global_step
        if trainer.global_step % self.refresh_rate == 0 or trainer.global_step == bar.total:
            metrics = trainer.progress_bar_metrics
            parts = [f"{short} {format_value(name, float(metrics[name]))}"
                     for name, short in BAR_METRICS.items() if name in metrics]
            budget = time_budget(trainer)
            if budget is not None:  # a trainer.max_time run: the clock is its total
                parts.insert(0, f"time {clock(budget[0])}/{clock(round(budget[0] + budget[1]))}")
            bar.set_postfix_str(" ".join(parts), refresh=False)
            bar.refresh()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not (self._enabled and trainer.is_global_zero) or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and v.numel() == 1}
        if not metrics:
            return
        line = f"step {trainer.global_step}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                                                          if not k.endswith("perplexity"))
        if self.bar is not None:
            self.bar.write(line, file=self.file or sys.stderr)
        else:
            print(line, file=self.file or sys.stderr, flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.n = trainer.global_step
            self.bar.refresh()
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_lightning() -> None:
    """Drop Lightning's advertisement tips (the only messages this filter matches)."""
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _DropTips) for f in handler.filters):
            handler.addFilter(_DropTips())


def model_line(pl_module: L.LightningModule) -> str:
    """One line in place of Lightning's module table: the encoder's shape and parameter counts."""
    total = sum(p.numel() for p in pl_module.parameters())
    encoders = [m for m in pl_module.modules() if hasattr(m, "config") and hasattr(m, "embeddings")]
    if not encoders:
        return f"model  {total / 1e6:.1f}M parameters"
    c = encoders[0].config
    embeddings = sum(p.numel() for p in encoders[0].embeddings.parameters())
    return (f"model  {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads, {c.norm_placement}-LN, "
            f"vocabulary {c.vocab_size}: {total / 1e6:.1f}M parameters ({(total - embeddings) / 1e6:.1f}M outside "
            "the embeddings)")


def batch_line(trainer: L.Trainer, per_device: int) -> str:
    """One line: the global batch as it is with the devices Lightning picked (``devices: auto``
    included), and how long the run is."""
    world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
    parts = [f"{per_device} per device"] + ([f"{world} devices"] if world > 1 else []) + (
        [f"{accumulate} micro-batches"] if accumulate > 1 else [])
    length = f"{trainer.max_steps} steps" if trainer.max_steps and trainer.max_steps > 0 else "until trainer.max_time" \
        if trainer.max_epochs in (None, -1) else f"{trainer.max_epochs} epochs"
    line = f"batch  {' x '.join(parts)} = {per_device * world * accumulate} sequences per optimizer step; {length}"
    return line


class ModelLine(L.Callback):
    """Prints :func:`model_line` once the model is built and :func:`batch_line` when training
    starts, from the training loader's batch size (rank 0)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(model_line(pl_module), flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        size = getattr(trainer.train_dataloader, "batch_size", None)
        if trainer.is_global_zero and size:
            tqdm.write(batch_line(trainer, size), file=sys.stdout)  # above a progress bar already drawn
