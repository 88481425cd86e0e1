"""Optimizers (AdamW, or LAMB for very large batches) with BERT's weight-decay exclusions,
gradient clipping that works for every kernel and precision, and the learning-rate
schedules: warmup, then linear (BERT), cosine, warmup-stable-decay or constant, by step or
by the share of a time budget used."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bertpre.errors import UserError

OPTIMIZERS = ("adamw", "lamb")
# AdamW's kernels: "fused" (one kernel per step; CUDA and, since torch 2.4, CPU), "foreach" (multi-tensor
# ops), "for-loop" (one tensor at a time); "auto" takes fused where torch has it (CUDA, CPU) and torch's
# default elsewhere. On this project's 2-core CPU, fused AdamW took 0.5 s off bert-small's 3.3 s step.
FUSED_DEVICES = ("cuda", "cpu")
IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")


class Lamb(Optimizer):
    """LAMB (You et al., 2019), as used for 32k-64k batches: per parameter tensor, the
    bias-corrected Adam direction plus decoupled weight decay,
    ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p``, is scaled by the trust ratio
    ``||p|| / ||u||`` (1 where either norm is zero): ``p -= lr * ratio * u``."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, as multi-tensor (``torch._foreach_*``)
        ops over each group: a few dozen kernels per group rather than a dozen per tensor, and no
        host synchronisation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            m_hat = torch._foreach_div(m, [1 - beta1**t for t in steps])
            denominator = torch._foreach_sqrt(torch._foreach_div(v, [1 - beta2**t for t in steps]))
            torch._foreach_add_(denominator, group["eps"])
            update = torch._foreach_div(m_hat, denominator)  # u = m_hat / (sqrt(v_hat) + eps)
            if group["weight_decay"]:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
            weight_norm = torch.stack(torch._foreach_norm(params))
            update_norm = torch.stack(torch._foreach_norm(update))
            ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
            torch._foreach_mul_(update, list((-group["lr"] * ratio).unbind()))
            torch._foreach_add_(params, update)  # p -= lr * ratio * u
        return loss


def parameter_groups(model: nn.Module, weight_decay: float, lr_scales: dict[int, float] | None = None) -> list[dict]:
    """Weight decay on matrices and embeddings; none on biases and LayerNorm parameters. A
    parameter shared by two modules (a decoder tied to the embeddings) is listed once.

    ``lr_scales`` (``id(parameter)`` -> factor, 1 for a parameter it lacks) splits the groups
    further by learning-rate factor, kept in each group's ``"lr_scale"``."""
    lr_scales = lr_scales or {}
    # (decays, factor) -> parameters; the two plain groups first, always, in this order
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            decays = not (isinstance(module, nn.LayerNorm) or name.endswith("bias"))
            groups.setdefault((decays, lr_scales.get(id(param), 1.0)), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (decays, scale), params in groups.items()]


SCHEDULES = ("linear", "cosine", "wsd", "constant")


def decay(schedule: str, progress: float, decay_fraction: float = 0.2) -> float:
    """LR multiplier after warmup, ``progress`` running 0 -> 1 from the end of warmup to the
    end of the run: ``linear`` 1 -> 0 (BERT); ``cosine`` half a cosine 1 -> 0; ``wsd``
    (warmup-stable-decay) 1 until the last ``decay_fraction`` of the run, then linear to 0;
    ``constant`` 1."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        return 1.0 if progress <= 1.0 - decay_fraction else (1.0 - progress) / decay_fraction
    if schedule == "constant":
        return 1.0
    raise UserError(f"model.lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def step_schedule(warmup_steps: int, total_steps: int, schedule: str = "linear", decay_fraction: float = 0.2):
    """LR multiplier by optimizer step: 0 -> 1 over ``warmup_steps``, then ``schedule`` down to
    the end at ``total_steps`` (linear: exactly 0 there)."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "linear":  # BERT's, in the form earlier bertpre versions computed it
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        return decay(schedule, (step - warmup_steps) / max(1, total_steps - warmup_steps), decay_fraction)

    return multiplier


def time_schedule(progress, warmup_fraction: float, schedule: str = "linear", decay_fraction: float = 0.2):
    """LR multiplier by the share of a time budget used, ``progress()`` in [0, 1] (read at each
    step): warmup over the first ``warmup_fraction`` of the time, then ``schedule`` down to the
    end of the budget, so that a run stopped by ``trainer.max_time`` ends its schedule there."""

    def multiplier(step: int) -> float:
        used = min(max(progress(), 0.0), 1.0)
        if used < warmup_fraction:
            return max(used / warmup_fraction, 1e-3)
        return decay(schedule, (used - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction), decay_fraction)

    return multiplier



def adamw_implementation(implementation: str, device_type: str) -> dict:
    """AdamW's keyword arguments that choose its kernel (see IMPLEMENTATIONS)."""
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"model.optimizer_implementation must be one of {', '.join(IMPLEMENTATIONS)}, "
                        f"got {implementation!r}")
    if implementation == "auto":
        implementation = "fused" if device_type in FUSED_DEVICES else "default"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
            "default": {}}[implementation]


def build_optimizer(
    model: nn.Module,
    name: str,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int,
    total_steps: int,
    implementation: str = "auto",
    multiplier=None,
    lr_scales: dict[int, float] | None = None,
) -> tuple[Optimizer, LambdaLR]:
    """The optimizer and its LR scheduler: ``multiplier(step)`` (default: warmup over
    ``warmup_steps``, linear decay to 0 at ``total_steps``) times ``learning_rate``, times a
    parameter's factor in ``lr_scales`` (see ``parameter_groups``)."""
    groups = parameter_groups(model, weight_decay, lr_scales)
    for group in groups:
        group["lr"] = learning_rate * group["lr_scale"]
    if name == "adamw":
        kernel = adamw_implementation(implementation, next(model.parameters()).device.type)
        optimizer = AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **kernel)
    elif name == "lamb":
        optimizer = Lamb(groups, lr=learning_rate, betas=betas, eps=eps)
    else:
        raise UserError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return optimizer, LambdaLR(optimizer, multiplier or step_schedule(warmup_steps, total_steps))


def clip_gradients(optimizer: Optimizer, max_value: float | None, algorithm: str | None = "norm",
                   precision=None) -> None:
    """Clip the gradients of ``optimizer``'s parameters (total norm, or each entry with
    ``algorithm="value"``) for any AdamW kernel and precision.

    Lightning refuses to clip for an optimizer that unscales inside its own step (fused AdamW),
    because under a GradScaler its gradients are still scaled when clipping runs. Here such
    gradients are unscaled first (``scaler.unscale_``; the scaler's step then knows they are),
    so the threshold applies to the true gradients; without a scaler (bf16, fp32) there is
    nothing to unscale. Other optimizers were unscaled by Lightning before this point.
    ``precision`` is a GradScaler or a Lightning precision plugin holding one (or neither);
    a ``max_value`` of None or 0 clips nothing.
    """
    if not max_value:
        return
    scaler = precision if hasattr(precision, "unscale_") else getattr(precision, "scaler", None)
    if algorithm not in (None, "norm", "value"):
        raise UserError(f"trainer.gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}")
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, max_value)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_value)
