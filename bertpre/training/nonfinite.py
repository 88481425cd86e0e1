"""Non-finite steps: ``NonFiniteGuard`` checks the loss and gradient norm of every step; a
non-finite step is reported with its number and skipped (no weight or optimizer update) or stops
the run.
"""

from __future__ import annotations

import lightning as L
import torch

from bertpre.errors import UserError


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


