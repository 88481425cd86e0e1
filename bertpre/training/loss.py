"""Pretraining loss: mean MLM cross-entropy over predicted tokens, plus the sentence objective's
cross-entropy (NSP's or SOP's 2-way head) when the data has sentence labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # an empty prediction slot (as bertpre.data.masking.IGNORE_INDEX)


@dataclass
class PretrainingLoss:
    loss: Tensor
    mlm_loss: Tensor
    mlm_accuracy: Tensor
    num_predicted: Tensor  # predicted tokens (a tensor: counting them needs no host sync)
    sentence_loss: Tensor | None = None  # NSP's or SOP's; None for MLM only (--objective none)
    sentence_accuracy: Tensor | None = None


def pretraining_loss(mlm_logits: Tensor, mlm_targets: Tensor, sentence_logits: Tensor | None = None,
                     sentence_labels: Tensor | None = None) -> PretrainingLoss:
    """``mlm_logits`` (..., V) at the prediction slots, ``mlm_targets`` (...) with IGNORE_INDEX in
    empty slots, ``sentence_logits`` (B, 2) and their labels (B,) or None. MLM loss and accuracy
    are means over the filled slots."""
    logits = mlm_logits.reshape(-1, mlm_logits.shape[-1])  # (N, V)
    targets = mlm_targets.reshape(-1)  # (N,)
    filled = targets != IGNORE_INDEX
    mlm_loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    count = filled.sum()
    out = PretrainingLoss(loss=mlm_loss, mlm_loss=mlm_loss,
                          mlm_accuracy=((logits.argmax(-1) == targets) & filled).sum() / count.clamp(min=1),
                          num_predicted=count)
    assert (sentence_logits is None) == (sentence_labels is None), "sentence logits and labels come together"
    if sentence_logits is not None:
        out.sentence_loss = F.cross_entropy(sentence_logits.float(), sentence_labels)
        out.sentence_accuracy = (sentence_logits.argmax(-1) == sentence_labels).float().mean()
        out.loss = mlm_loss + out.sentence_loss
    return out
