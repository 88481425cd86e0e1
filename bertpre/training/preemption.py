"""Preemption: ``PreemptionCheckpoint`` saves ``last.ckpt`` after the current step when SIGTERM,
SIGUSR1 (what SLURM sends before preemption) or a first Ctrl-C arrives, then stops the run
(under DDP the ranks agree every 10 steps; under SLURM's auto-requeue SIGUSR1 stays Lightning's).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bertpre.training.checkpointing import checkpoint_dir

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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


