"""Does the model use context? The MLM plateau metric.

A model on the MLM plateau predicts masked tokens from their own position and the token
frequencies, barely from the words around them. ``random_context`` replaces every unmasked
ordinary token of a batch with a random vocabulary entry, keeping the predicted positions,
the special tokens and the padding; the model's MLM accuracy on that batch, subtracted from
its accuracy on the real batch, is the context gain (``val/mlm_context_gain``): about zero on
the plateau, and the share of predictions context buys once the model has left it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bertpre.data.masking import IGNORE_INDEX


def ordinary_ids(vocab_size: int, special: list[int]) -> Tensor:
    """The ids a random context token is drawn from: every id but the special tokens."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[torch.tensor(sorted(set(special)), dtype=torch.long)] = False
    return keep.nonzero().squeeze(1)


def random_context(input_ids: Tensor, labels: Tensor, attention_mask: Tensor, ordinary: Tensor, special: Tensor,
                   generator: torch.Generator) -> Tensor:
    """``input_ids`` (B, T) with each unmasked, unpadded ordinary token replaced by a random
    ordinary id; positions with a label (the predicted ones) and special tokens are kept."""
    replace = (labels == IGNORE_INDEX) & attention_mask.bool() & ~torch.isin(input_ids, special)  # (B, T)
    draws = torch.randint(len(ordinary), input_ids.shape, generator=generator, device=generator.device)
    return torch.where(replace, ordinary.to(input_ids.device)[draws.to(input_ids.device)], input_ids)

