"""Faults during training: atomic checkpoints, resuming from the last good one, preemption
signals, non-finite steps, and output folders that cannot take the run's checkpoints.

- ``AtomicCheckpointIO`` writes a checkpoint to a temporary file in the same folder,
  fsyncs it and renames it over the target: a kill at any moment leaves either the old
  file or the new one, never a truncated one.
- ``resolve_ckpt_path`` checks the checkpoint a run resumes from (a truncated or corrupt
  file gets an error naming the newest good one) and understands ``last-good``.
- ``PreemptionCheckpoint`` saves ``last.ckpt`` after the current step when SIGTERM,
  SIGUSR1 (what SLURM sends before preemption) or a first Ctrl-C arrives, then stops the run
  (under DDP the ranks agree every 10 steps; under SLURM's auto-requeue SIGUSR1 stays Lightning's).
- ``NonFiniteGuard`` checks the loss and gradient norm of every step: a non-finite step is
  reported with its number and skipped (no weight or optimizer update) or stops the run.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bertpre.checkpoint import checkpoint_dir, checkpoint_problem, newest_good_checkpoint, run_checkpoints
from bertpre.errors import UserError
from bertpre.outputs import atomic_write

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM, SIGUSR1 or a first Ctrl-C (SIGINT): finish the current step, save
    ``last.ckpt``, stop (a signal that arrives after this callback's turn in a step is taken
    at the end of the next one: checkpoints are only taken where a step has fully ended).
    A second Ctrl-C aborts at once (KeyboardInterrupt), saving nothing more.

    Under DDP every rank must stop after the same step: the ranks agree (one all-reduce) at the end of
    every ``agree_every_n_steps``-th optimizer step, not at every step, so a signal is taken within that
    many steps. SIGUSR1 is left to a handler that was there first: under SLURM that is Lightning's
    auto-requeue, which saves ``hpc_ckpt_N.ckpt`` in the run folder and requeues the job.

    ``stopped`` keeps such a stop (signal, checkpoint, step) for the command line that made
    this callback, which reports it (``report``) and exits with 128 + the signal number."""

    def __init__(self, agree_every_n_steps: int = 10) -> None:
        self.agree_every_n_steps = agree_every_n_steps  # under DDP: how often the ranks agree to stop
        self.agreed_at: int | None = None
        self.stopped: tuple[int, str, int] | None = None
        self.received: int | None = None
        self.saved: str | None = None
        self.step: int | None = None
        self.previous: dict[int, Any] = {}
        self.installed: dict[int, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = self.saved = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Installed here, after Lightning's own SIGTERM handler (set between ``on_fit_start`` and
        training), which it replaces: Lightning's would stop the loop after whatever part of the
        step is running, and a checkpoint taken there counts the step's batch as done while the
        logs count it again (the resumed run logged one step late)."""
        self.agreed_at = trainer.global_step  # the step a resumed run starts at has ended already
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (*PREEMPTION_SIGNALS, signal.SIGINT):
            self.previous[signum] = signal.getsignal(signum)
            if signum == signal.SIGUSR1 and self.previous[signum] not in (signal.SIG_DFL, signal.SIG_IGN, None):
                # someone handles SIGUSR1 already: under SLURM, Lightning's auto-requeue (an hpc_ckpt_N.ckpt in
                # the run folder, then `scontrol requeue`; the requeued job resumes from it); keep theirs
                del self.previous[signum]
                continue

            def handler(number, frame):
                if number == signal.SIGINT:
                    if self.received is not None:  # the second Ctrl-C: abort now
                        raise KeyboardInterrupt
                    if trainer.is_global_zero:
                        print("\nbertpre: Ctrl-C: saving last.ckpt after this step, then stopping "
                              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)
                self.received = number

            signal.signal(signum, handler)
            self.installed[signum] = handler

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self.previous.items():
            if signal.getsignal(signum) is self.installed.get(signum):  # not already restored by Lightning
                signal.signal(signum, previous)
        self.previous, self.installed = {}, {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            # every rank must stop after the same step, so the ranks agree, but not at every step (a collective
            # and a host sync): at the end of every agree_every_n_steps-th optimizer step, the same on all ranks
            step = trainer.global_step
            if step == self.agreed_at or step % self.agree_every_n_steps:
                return  # not the end of an optimizer step (accumulation), or not one where the ranks agree
            self.agreed_at = step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not self.saved:
            self._save_and_stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """SIGTERM that arrives before training starts (Lightning's handler is still the one set)
        ends the first step with Lightning's SIGTERMException: save then."""
        if isinstance(exception, SIGTERMException) and not self.saved:
            self.received = self.received or signal.SIGTERM
            self._save_and_stop(trainer)

    def _save_and_stop(self, trainer: L.Trainer) -> None:
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the full training state
        self.saved, self.step = str(path), trainer.global_step
        self.stopped = (self.received or signal.SIGTERM, self.saved, self.step)
        trainer.should_stop = True

    def report(self) -> int | None:
        """Print the preemption stop, if any; returns the exit code for it."""
        if self.stopped is None:
            return None
        signum, path, step = self.stopped
        self.stopped = None
        print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path}; "
              f"resume with the same command and --ckpt_path last", flush=True)
        return 128 + signum


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


class NonFiniteGuard(L.Callback):
    """Watches each step's loss and gradient norm before the optimizer step.

    ``action="skip"``: a non-finite step is reported with its number and its gradients are
    dropped, so the optimizer leaves weights and moments as they were; the run stops after
    ``max_in_a_row`` such steps in a row. Deciding to skip needs the values on the host: one
    host sync per optimizer step (as a GradScaler's skip does).

    ``action="stop"``: the run stops, naming the first non-finite step. No per-step sync: the
    verdict accumulates on the device and is read every ``trainer.log_every_n_steps`` steps,
    before each validation, before every checkpoint is written and at the end, so no checkpoint ever
    holds the weights of a non-finite step (resume with ``--ckpt_path last-good``).
    """

    def __init__(self, action: str = "skip", max_in_a_row: int = 10) -> None:
        if action not in ("skip", "stop"):
            raise UserError(f"model.nonfinite must be 'skip' or 'stop', got {action!r}")
        if max_in_a_row < 1:
            raise UserError(f"model.max_nonfinite_in_a_row must be at least 1, got {max_in_a_row}")
        self.action, self.max_in_a_row = action, max_in_a_row
        self.in_a_row = 0
        self.succeeded = 0  # finite steps of this run (skip); stop counts none
        self.skipped: list[int] = []
        self.loss: torch.Tensor | None = None  # this step's loss, handed over by the module's training_step
        self.first_bad: torch.Tensor | None = None  # stop: (step, loss, norm) of the first non-finite step, on device

    def observe(self, loss: torch.Tensor) -> None:
        """The training step's loss, checked with the gradients before the optimizer step."""
        self.loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            # 16-mixed: overflowing (scaled) gradients are the GradScaler's business: it skips that step
            # and lowers its scale. Only a non-finite loss is a fault here.
            norm = torch.zeros((), device=grads[0].device)
        elif hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one fused kernel per device and dtype
            norm = torch.nn.utils.get_total_norm(grads)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))
        loss = self.loss if self.loss is not None else torch.zeros((), device=norm.device)
        if self.action == "stop":
            self._note(trainer.global_step + 1, loss.float().to(norm.device), norm.float())
            return
        finite = torch.isfinite(norm) & torch.isfinite(loss)
        if trainer.world_size > 1:
            finite = torch.tensor(trainer.strategy.reduce_boolean_decision(bool(finite), all=True))
        if bool(finite):
            self.in_a_row = 0
            self.succeeded += 1
            return
        step = trainer.global_step + 1
        what = f"step {step}: non-finite {self._values(loss, norm)}"
        self._drop_gradients(trainer, optimizer)
        self.in_a_row += 1
        self.skipped.append(step)
        if trainer.is_global_zero:
            print(f"bertpre: {what}; batch skipped ({self.in_a_row} in a row)", flush=True)
        if self.in_a_row >= self.max_in_a_row:
            raise UserError(f"{what}; {self.in_a_row} non-finite steps in a row: the run has diverged "
                            f"(lower model.learning_rate or raise warmup); the last checkpoint holds finite weights")

    @staticmethod
    def _drop_gradients(trainer: L.Trainer, optimizer) -> None:
        """Make the coming optimizer step a no-op. Without a GradScaler: no gradients, no update.
        Under a GradScaler (16-mixed) with an optimizer that unscales inside its own step (fused
        AdamW), the scaler has not looked at the gradients yet and must find an inf in them, or its
        ``update()`` fails ("No inf checks were recorded"): the gradients are set to NaN, the scaler
        skips the step and lowers its scale, as for an overflow. Other optimizers were unscaled
        before this hook (the scaler has its verdict): their gradients are dropped."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        poison = scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if poison and p.grad is not None:
                    p.grad.fill_(float("nan"))
                else:
                    p.grad = None

    @staticmethod
    def _values(loss: torch.Tensor, norm: torch.Tensor) -> str:
        parts = [f"loss {float(loss):.4g}"] if not torch.isfinite(loss) else []
        parts += [f"gradient norm {float(norm):.4g}"] if not torch.isfinite(norm) else []
        return " and ".join(parts) or "values on another rank"

    def _note(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Keep the first non-finite step's (step, loss, norm) on the device: no host sync."""
        now = torch.stack([torch.full((), float(step), device=norm.device), loss, norm])  # a fill kernel, no copy
        if self.first_bad is None:
            self.first_bad = torch.full((3,), float("nan"), device=norm.device)
        first = torch.isnan(self.first_bad[0]) & ~(torch.isfinite(loss) & torch.isfinite(norm))
        self.first_bad = torch.where(first, now, self.first_bad)

    def check(self, trainer: L.Trainer) -> None:
        """stop: read the verdict (one host sync) and stop the run if any step so far was non-finite."""
        if self.action != "stop" or self.first_bad is None:
            return
        bad = not torch.isnan(self.first_bad[0])
        if trainer.world_size > 1:
            bad = not trainer.strategy.reduce_boolean_decision(not bad, all=True)
        if not bad:
            return
        if torch.isnan(self.first_bad[0]):
            raise UserError(f"step {trainer.global_step}: non-finite values on another rank; stopping "
                            "(model.nonfinite: stop); the last checkpoint holds finite weights")
        step, loss, norm = self.first_bad.tolist()
        raise UserError(f"step {int(step)}: non-finite {self._values(torch.tensor(loss), torch.tensor(norm))}; "
                        f"stopping (model.nonfinite: stop; seen at step {trainer.global_step}); the last checkpoint "
                        "holds finite weights")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.check(trainer)  # raising here writes nothing: no checkpoint of non-finite weights

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)  # a run never ends as a success after a non-finite step


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def checkpoint_bytes(module: torch.nn.Module, optimizer_states_per_parameter: int = 2) -> int:
    """About the size of a training checkpoint: weights plus the optimizer's moments."""
    parameters = sum(p.numel() * p.element_size() for p in module.parameters())
    return math.ceil(parameters * (1 + optimizer_states_per_parameter) * 1.05)
