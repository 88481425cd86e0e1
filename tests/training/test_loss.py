"""The MLM loss (bertpre.training.loss): its own backward gives F.cross_entropy's value and
gradient, in every dtype the step feeds it, with empty slots, and under torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from bertpre.training.loss import IGNORE_INDEX, masked_lm_cross_entropy


def logits_and_targets(n=48, vocab=37, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, vocab, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.3] = IGNORE_INDEX  # empty prediction slots
    return logits, targets


def value_and_gradient(loss_fn, logits, targets, upstream=1.0):
    logits.grad = None
    loss = loss_fn(logits, targets)
    (upstream * loss).backward()
    return loss.detach(), logits.grad.clone()


def reference(logits, targets):  # in float32, or float64 for float64 logits
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_the_mlm_loss_and_its_gradient_are_cross_entropys(dtype, tolerance):
    logits, targets = logits_and_targets(dtype=dtype)
    ours, our_grad = value_and_gradient(masked_lm_cross_entropy, logits, targets, upstream=0.7)
    theirs, their_grad = value_and_gradient(reference, logits, targets, upstream=0.7)
    assert our_grad.dtype == dtype == logits.dtype
    assert abs(ours.item() - theirs.item()) <= tolerance * abs(theirs.item())
    assert (our_grad.float() - their_grad.float()).abs().max() <= tolerance * their_grad.float().abs().max()
    empty = targets == IGNORE_INDEX
    assert empty.any() and (our_grad[empty] == 0).all(), "an empty slot gets no gradient"


def test_the_mlm_loss_passes_gradcheck():
    logits, targets = logits_and_targets(n=9, vocab=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(masked_lm_cross_entropy, (logits, targets))


def test_a_batch_without_a_filled_slot_is_nan_as_in_cross_entropy():
    logits = torch.randn(4, 11, requires_grad=True)
    targets = torch.full((4,), IGNORE_INDEX)
    assert torch.isnan(masked_lm_cross_entropy(logits, targets)) and torch.isnan(reference(logits, targets))


def test_the_mlm_loss_compiles_in_one_graph_with_the_same_gradient():
    logits, targets = logits_and_targets(n=64, vocab=50)
    eager, eager_grad = value_and_gradient(masked_lm_cross_entropy, logits, targets)
    compiled_fn = torch.compile(masked_lm_cross_entropy, fullgraph=True, backend="aot_eager")
    compiled, compiled_grad = value_and_gradient(compiled_fn, logits, targets)
    assert torch.allclose(compiled, eager) and torch.allclose(compiled_grad, eager_grad, atol=1e-7)
