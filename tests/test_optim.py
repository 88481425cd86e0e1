import math

import pytest
import torch

from bertpre.errors import UserError
from bertpre.model import BertConfig, BertForPretraining
from bertpre.optim import Lamb, build_optimizer, linear_schedule, parameter_groups


def test_lamb_update_rule_by_hand():
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0]))  # ||p|| = 5
    lr, wd, eps, (b1, b2) = 0.1, 0.01, 1e-6, (0.9, 0.999)
    optimizer = Lamb([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    weights = p.detach().clone()
    m = torch.zeros(2)
    v = torch.zeros(2)
    for step, grad in enumerate([torch.tensor([0.5, 1.0]), torch.tensor([-2.0, 0.25])], start=1):
        p.grad = grad.clone()
        optimizer.step()
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps) + wd * weights
        weights = weights - lr * (weights.norm() / update.norm()) * update
        torch.testing.assert_close(p.detach(), weights, rtol=1e-6, atol=1e-7)


def test_lamb_trust_ratio_scales_the_step_with_the_weight_norm():
    # Same gradient direction, weights 100x larger: LAMB's step is 100x larger, Adam's is not.
    steps = []
    for scale in (1.0, 100.0):
        p = torch.nn.Parameter(torch.full((4,), scale))
        optimizer = Lamb([p], lr=0.01)
        p.grad = torch.ones(4)
        optimizer.step()
        steps.append((scale - p.detach()).abs().mean().item())
    assert math.isclose(steps[1] / steps[0], 100.0, rel_tol=1e-4)


def test_lamb_with_zero_weights_falls_back_to_a_plain_adam_step():
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = Lamb([p], lr=0.5)
    p.grad = torch.tensor([1.0, -1.0, 2.0])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.5, 0.5, -0.5]), rtol=1e-5, atol=1e-6)


def test_weight_decay_groups_exclude_biases_and_layernorm():
    model = BertForPretraining(BertConfig.from_preset("bert-tiny", vocab_size=100))
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "embeddings.word.weight" in decayed and "layers.0.query.weight" in decayed
    assert "layers.0.query.bias" in not_decayed and "mlm_bias" in not_decayed
    assert "layers.0.attention_norm.weight" in not_decayed and "embeddings.norm.weight" in not_decayed
    assert len(decayed) + len(not_decayed) == len(names)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


def test_a_weight_tied_across_modules_is_optimised_once():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    model = transformers.BertForPreTraining(config)  # its decoder weight and bias are tied to other modules'
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    groups = parameter_groups(model, 0.01)
    listed = [id(p) for group in groups for p in group["params"]]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))


def test_linear_warmup_then_linear_decay_to_zero():
    f = linear_schedule(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == 0.0


def test_optimizer_choice():
    model = BertForPretraining(BertConfig.from_preset("bert-tiny", vocab_size=100))
    optimizer, _ = build_optimizer(model, "lamb", 1e-3, 0.01, (0.9, 0.999), 1e-6, 10, 100)
    assert isinstance(optimizer, Lamb)
    optimizer, _ = build_optimizer(model, "adamw", 1e-3, 0.01, (0.9, 0.999), 1e-6, 10, 100)
    assert isinstance(optimizer, torch.optim.AdamW)
    with pytest.raises(UserError, match="model.optimizer must be one of adamw, lamb"):
        build_optimizer(model, "sgd", 1e-3, 0.01, (0.9, 0.999), 1e-6, 10, 100)
