"""Optimizers (AdamW, or LAMB for very large batches) with BERT's weight-decay exclusions,
and the linear warmup / linear decay schedule."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bertpre.errors import UserError

OPTIMIZERS = ("adamw", "lamb")


class Lamb(Optimizer):
    """LAMB (You et al., 2019), as used for 32k-64k batches: per parameter tensor, the
    bias-corrected Adam direction plus decoupled weight decay,
    ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p``, is scaled by the trust ratio
    ``||p|| / ||u||`` (1 where either norm is zero): ``p -= lr * ratio * u``."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                weight_norm, update_norm = p.norm(), update.norm()
                ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                p.sub_(group["lr"] * ratio * update)
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings; none on biases and LayerNorm parameters. A
    parameter shared by two modules (a decoder tied to the embeddings) is listed once."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, nn.LayerNorm) or name.endswith("bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(warmup_steps: int, total_steps: int):
    """LR multiplier: 0 -> 1 over ``warmup_steps``, then 1 -> 0 at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


def build_optimizer(
    model: nn.Module,
    name: str,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int,
    total_steps: int,
) -> tuple[Optimizer, LambdaLR]:
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        on_cuda = next(model.parameters()).is_cuda
        optimizer = AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=on_cuda or None)
    elif name == "lamb":
        optimizer = Lamb(groups, lr=learning_rate, betas=betas, eps=eps)
    else:
        raise UserError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return optimizer, LambdaLR(optimizer, linear_schedule(warmup_steps, total_steps))
