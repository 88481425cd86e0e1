"""Pretraining loss: mean MLM cross-entropy over predicted tokens + NSP cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass
class PretrainingLoss:
    loss: Tensor
    mlm_loss: Tensor
    nsp_loss: Tensor
    mlm_accuracy: Tensor
    nsp_accuracy: Tensor
    num_predicted: int


def pretraining_loss(mlm_logits: Tensor, mlm_targets: Tensor, nsp_logits: Tensor, nsp_labels: Tensor) -> PretrainingLoss:
    """``mlm_logits`` (P, V) at the predicted positions, ``mlm_targets`` (P,), ``nsp_logits`` (B, 2)."""
    mlm_loss = F.cross_entropy(mlm_logits.float(), mlm_targets)
    nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
    return PretrainingLoss(
        loss=mlm_loss + nsp_loss,
        mlm_loss=mlm_loss,
        nsp_loss=nsp_loss,
        mlm_accuracy=(mlm_logits.argmax(-1) == mlm_targets).float().mean(),
        nsp_accuracy=(nsp_logits.argmax(-1) == nsp_labels).float().mean(),
        num_predicted=mlm_targets.numel(),
    )
