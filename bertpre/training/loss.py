"""Pretraining loss: mean MLM cross-entropy over predicted tokens, plus the sentence objective's
cross-entropy (NSP's or SOP's 2-way head) when the data has sentence labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # an empty prediction slot (as bertpre.data.masking.IGNORE_INDEX)


class _MaskedLMCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX) in float32 at least: the mean over the
    filled slots (NaN without one, as there), with a backward that writes (softmax - one-hot) x
    the slot's weight into one new tensor. F.cross_entropy's backward zero-fills an (N, V)
    gradient for the NLL and then runs log-softmax's backward over it: two more passes over the
    step's largest tensor (on 2 CPU cores the loss's share of bert-mini's step halves). bf16 and
    fp16 logits are computed in float32, float64 ones in float64."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, V)
        safe = targets.clamp(min=0)  # (N,): an empty slot reads class 0, weighted 0
        filled = targets != IGNORE_INDEX  # (N,)
        count = filled.sum()
        loss = -(log_probs.gather(1, safe[:, None]).squeeze(1) * filled).sum() / count
        ctx.save_for_backward(log_probs, safe, filled, count)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        log_probs, safe, filled, count = ctx.saved_tensors
        weight = grad * filled / count  # (N,): d loss / d (log-prob of the target)
        logits_grad = torch.exp(log_probs).mul_(weight[:, None])  # (N, V): softmax x weight
        logits_grad.scatter_add_(1, safe[:, None], -weight[:, None])  # minus the one-hot
        return logits_grad.to(ctx.logits_dtype), None


def masked_lm_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, V) over the slots whose ``targets`` (N,) are not
    IGNORE_INDEX, computed in float32 at least; the gradient comes back in the logits' dtype."""
    return _MaskedLMCrossEntropy.apply(logits, targets)


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
    mlm_loss = masked_lm_cross_entropy(logits, targets)
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
