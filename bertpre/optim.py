"""AdamW with BERT's weight-decay exclusions and a linear warmup / linear decay schedule."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings; none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
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
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int,
    total_steps: int,
) -> tuple[AdamW, LambdaLR]:
    optimizer = AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps)
    return optimizer, LambdaLR(optimizer, linear_schedule(warmup_steps, total_steps))
