"""Checkpointing a run: atomic checkpoint files, the run's checkpoint folder (finding its
checkpoints, refusing another run's, deleting them on ``--overwrite``), checking the checkpoint a
run resumes from (``last``, ``last-good``), the disk checks, and the final checkpoint of a run
that stops between intervals.

- ``AtomicCheckpointIO`` writes a checkpoint to a temporary file in the same folder, streamed,
  fsyncs it and renames it over the target: a kill at any moment leaves either the old file or
  the new one, never a truncated one.
- ``resolve_ckpt_path`` checks the checkpoint a run resumes from (a truncated or corrupt
  file gets an error naming the newest good one) and understands ``last-good``.

Reading a checkpoint and building the model it holds (no Lightning) is ``bertpre.model.checkpoint``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bertpre.errors import UserError
from bertpre.model.checkpoint import checkpoint_problem
from bertpre.outputs import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Streamed into the temporary file tensor by tensor (no copy of the whole file in memory:
        a bert-large training checkpoint is about 4 GB); a failed write (a full disk) is an OSError,
        which leaves no temporary file and the previous checkpoints as they were."""
        try:
            atomic_write(path, lambda f: _stream(checkpoint, f), what=f"checkpoint {path}")
        except UserError as e:
            raise UserError(f"{e}; the previous checkpoints are intact") from None


class _WriteErrors:
    """A file for ``torch.save`` that remembers a failed write: torch's writer does not pass the
    OSError of a full disk on, it fails later with an unrelated RuntimeError."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def _stream(checkpoint: dict[str, Any], file) -> None:
    """``torch.save`` into ``file`` record by record; a failed write raises its own OSError."""
    writer = _WriteErrors(file)
    try:
        torch.save(checkpoint, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise
    if writer.error is not None:
        raise writer.error


def resolve_ckpt_path(ckpt_path: str | None, directory: Path) -> str | None:
    """The checkpoint to resume from, checked. ``last``: the newest checkpoint in
    ``directory`` (normally last.ckpt; a newer step file if the run died between the
    two saves; none yet: start from scratch, as Lightning does); ``last-good``: the newest
    complete one, skipping damaged files."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last-good":
        good = newest_good_checkpoint(directory)
        if good is None:
            raise UserError(f"ckpt_path last-good: no complete checkpoint in {directory}")
        return str(good)
    if ckpt_path == "last":
        candidates = run_checkpoints(directory)
        if not candidates:
            return "last"  # Lightning warns and starts from scratch
        path = candidates[-1]
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            raise UserError(f"ckpt_path {ckpt_path}: not found")
    check_checkpoint_file(path)
    return str(path)


def check_checkpoint_file(path: Path) -> None:
    """Raise a UserError naming the newest good checkpoint beside ``path`` if ``path`` is damaged."""
    problem = checkpoint_problem(path)
    if problem:
        good = newest_good_checkpoint(path.parent, exclude=path)
        hint = f"the newest good one is {good} (resume with --ckpt_path last-good)" if good else \
            "there is no other complete checkpoint there"
        raise UserError(f"ckpt_path {path}: {problem}; {hint}")


def check_writable(directory: Path, option: str) -> None:
    """Refuse to start when ``directory`` cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".bertpre-write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{option} {directory}: cannot write there ({e.strerror})") from None


def check_free_space(directory: Path, bytes_per_checkpoint: int, checkpoints: int, option: str) -> None:
    """Refuse to start when ``directory`` cannot be written or cannot hold the run's checkpoints."""
    check_writable(directory, option)
    needed = bytes_per_checkpoint * checkpoints
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserError(
            f"{option} {directory}: {free / 1e6:.0f} MB free, but the run keeps up to {checkpoints} checkpoints of "
            f"about {bytes_per_checkpoint / 1e6:.0f} MB ({needed / 1e6:.0f} MB); free space or change "
            f"{option} / save_top_k"
        )


class RunFolderCheck(L.Callback):
    """What the run folder holds, as each rank sees it, and the stale checkpoints an ``--overwrite``
    run replaces. ``bertpre train`` fills it in before fit (``view``, ``stale``); once the processes
    are connected (``setup``) the ranks compare their views (a run folder on node-local disks gives
    each node another set of checkpoints, and a resume on one node but not on another would hang or
    diverge), and only rank 0 deletes the stale checkpoints."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.view: tuple = ()  # (checkpoint names, the checkpoint the run resumes from)
        self.stale: list[Path] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            first = trainer.strategy.broadcast(self.view, src=0)
            if not trainer.strategy.reduce_boolean_decision(first == self.view, all=True):
                rank = trainer.global_rank
                seen = "" if first == self.view else f"; this rank (rank {rank}) sees {_described(self.view)}"
                raise UserError(f"the ranks see different run folders at trainer.default_root_dir ({self.directory}): "
                                f"rank 0 sees {_described(first)}{seen}; put the run folder on a file system that "
                                "every node shares")
        if trainer.is_global_zero:
            for path in self.stale:
                path.unlink(missing_ok=True)
        if trainer.world_size > 1:
            trainer.strategy.barrier()  # no rank writes a checkpoint before the stale ones are gone


def _described(view: tuple) -> str:
    names, resume = view
    held = f"{len(names)} checkpoints ({names[-1]}, ...)" if names else "no checkpoints"
    return held + (f", resuming from {Path(resume).name}" if resume else "")


class FinalCheckpoint(L.Callback):
    """A run that stops between checkpoint intervals (``trainer.max_time``, a ``max_steps``
    that is not a multiple of the interval) still ends with ``last.ckpt`` at its final step,
    when the run keeps a last checkpoint (``save_last``)."""

    def __init__(self) -> None:
        self.saved_step = -1

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last and 0 < trainer.global_step != self.saved_step:
            trainer.save_checkpoint(checkpoint_dir(trainer) / "last.ckpt", weights_only=callback.save_weights_only)


def checkpoint_bytes(module: torch.nn.Module, optimizer_states_per_parameter: int = 2) -> int:
    """About the size of a training checkpoint: weights plus the optimizer's moments."""
    parameters = sum(p.numel() * p.element_size() for p in module.parameters())
    return math.ceil(parameters * (1 + optimizer_states_per_parameter) * 1.05)



def _step_of(path: Path) -> int:
    digits = path.stem.rsplit("step=", 1)[-1] if "step=" in path.stem else ""
    return int(digits) if digits.isdigit() else -1


def checkpoint_dir(trainer) -> Path:
    """Where a run's checkpoints go: the checkpoint callback's folder, else ``<run>/checkpoints``."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def run_checkpoints(directory: Path) -> list[Path]:
    """The checkpoints in a run's checkpoint folder, oldest first (by modification time, with
    ``last.ckpt`` after a step file of the same time, then by step)."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt", _step_of(p)))


def newest_good_checkpoint(directory: Path, exclude: Path | None = None) -> Path | None:
    """The newest complete checkpoint in ``directory``."""
    candidates = [p for p in reversed(run_checkpoints(directory)) if p != exclude]
    return next((p for p in candidates if checkpoint_problem(p) is None), None)


