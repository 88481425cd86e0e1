"""Pretraining loss: mean MLM cross-entropy over predicted tokens + NSP cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # an empty prediction slot (as bertpre.data.masking.IGNORE_INDEX)


@dataclass
class PretrainingLoss:
    loss: Tensor
    mlm_loss: Tensor
    nsp_loss: Tensor
    mlm_accuracy: Tensor
    nsp_accuracy: Tensor
    num_predicted: Tensor  # predicted tokens (a tensor: counting them needs no host sync)


def pretraining_loss(mlm_logits: Tensor, mlm_targets: Tensor, nsp_logits: Tensor, nsp_labels: Tensor) -> PretrainingLoss:
    """``mlm_logits`` (..., V) at the prediction slots, ``mlm_targets`` (...) with IGNORE_INDEX in
    empty slots, ``nsp_logits`` (B, 2). MLM loss and accuracy are means over the filled slots."""
    logits = mlm_logits.reshape(-1, mlm_logits.shape[-1])  # (N, V)
    targets = mlm_targets.reshape(-1)  # (N,)
    filled = targets != IGNORE_INDEX
    mlm_loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
    count = filled.sum()
    return PretrainingLoss(
        loss=mlm_loss + nsp_loss,
        mlm_loss=mlm_loss,
        nsp_loss=nsp_loss,
        mlm_accuracy=((logits.argmax(-1) == targets) & filled).sum() / count.clamp(min=1),
        nsp_accuracy=(nsp_logits.argmax(-1) == nsp_labels).float().mean(),
        num_predicted=count,
    )
