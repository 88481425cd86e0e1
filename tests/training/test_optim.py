import math

import pytest
import torch

from bertpre.errors import UserError
from bertpre.model.bert import BertConfig, BertForPretraining
from bertpre.training.optim import Lamb, build_optimizer, parameter_groups, step_schedule


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


def test_learning_rate_factors_split_the_groups_and_scale_each_rate():
    """A parameter with a factor trains at learning rate x factor through warmup and decay, in its own
    group with the right weight decay; parameters without one keep the plain two groups' rate."""
    model = BertForPretraining(BertConfig.from_preset("bert-tiny", vocab_size=100))
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {id(p): 0.5 for p in model.layers[0].parameters()}
    scales.update({id(model.embeddings.word.weight): 0.25})
    optimizer, scheduler = build_optimizer(model, "adamw", 1e-3, 0.01, (0.9, 0.999), 1e-6, 10, 100, lr_scales=scales)
    by_name = {names[id(p)]: group for group in optimizer.param_groups for p in group["params"]}
    assert len(by_name) == len(names), "every parameter once"
    assert by_name["layers.0.query.weight"]["lr"] == pytest.approx(0.5e-4)  # warmup step 0: 1/10 of the rate
    assert by_name["layers.0.query.bias"]["weight_decay"] == 0.0 and by_name["layers.0.query.weight"]["weight_decay"] == 0.01
    assert by_name["embeddings.word.weight"]["lr"] == pytest.approx(0.25e-4)
    assert by_name["layers.1.query.weight"]["lr"] == pytest.approx(1e-4) == by_name["embeddings.position.weight"]["lr"]
    for _ in range(59):
        scheduler.step()  # step 59 of warmup 10, total 100: (100 - 59) / 90 of the rate
    assert by_name["layers.0.ffn_in.weight"]["lr"] == pytest.approx(0.5e-3 * 41 / 90)
    assert by_name["layers.1.ffn_in.weight"]["lr"] == pytest.approx(1e-3 * 41 / 90)
    plain = parameter_groups(model, 0.01)
    assert [g["lr_scale"] for g in plain] == [1.0, 1.0], "without factors: BERT's two groups"


def test_linear_warmup_then_linear_decay_to_zero():
    f = step_schedule(warmup_steps=10, total_steps=110)
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


def test_schedules_after_warmup_have_their_shapes():
    from bertpre.training.optim import step_schedule

    warmup, total = 10, 110
    for name in ("linear", "cosine", "wsd", "constant"):
        f = step_schedule(warmup, total, name, decay_fraction=0.2)
        assert [f(s) for s in range(warmup)] == [(s + 1) / warmup for s in range(warmup)], name
        assert f(warmup) == 1.0, name
    cosine = step_schedule(warmup, total, "cosine")
    assert abs(cosine(60) - 0.5) < 1e-12 and cosine(total) == 0.0
    wsd = step_schedule(warmup, total, "wsd", decay_fraction=0.2)  # decays over the last 20 of 100 steps
    assert wsd(90) == 1.0 and abs(wsd(100) - 0.5) < 1e-12 and wsd(total) == 0.0
    assert step_schedule(warmup, total, "constant")(total) == 1.0
    linear = step_schedule(warmup, total, "linear")
    assert linear(60) == 0.5 and linear(total) == 0.0


def test_the_time_schedule_follows_the_share_of_the_budget_used():
    from bertpre.training.optim import time_schedule

    used = [0.0]
    f = time_schedule(lambda: used[0], warmup_fraction=0.1, schedule="linear")
    values = {}
    for share in (0.05, 0.1, 0.55, 1.0, 1.2):
        used[0] = share
        values[share] = f(123)  # the step number does not matter, the clock does
    assert values == pytest.approx({0.05: 0.5, 0.1: 1.0, 0.55: 0.5, 1.0: 0.0, 1.2: 0.0}, abs=1e-12)


@pytest.mark.slow  # minutes of the default suite's five; runs in CI's slow line
@pytest.mark.parametrize("schedule_by", ["time", "steps"])
def test_a_time_budget_run_ends_its_schedule_within_the_budget(sample_prepared, tmp_path, capsys, schedule_by):
    """--trainer.max_time with a huge max_steps used to keep the max_steps schedule (still warming
    up when time ran out); with model.schedule_by time, and now also with the default (steps) when
    max_time ends the run first, the LR has decayed to near 0 at the end."""
    import csv

    from conftest import ROOT

    from bertpre.cli import main

    run = tmp_path / "run"
    main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
          "--trainer.default_root_dir", str(run), "--trainer.max_steps", "100000", "--trainer.max_time",
          "00:00:00:15", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--trainer.log_every_n_steps", "1", "--model.schedule_by", schedule_by, "--model.warmup_fraction", "0.1",
          "--data.batch_size", "4"])
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    peak = 1e-3  # bert-tiny.yaml
    # (the step-based schedule of 100,000 steps would still be warming up: lr < 1e-5 after 10,000 steps)
    assert len(lrs) >= 5 and lrs[0] < 0.5 * peak and max(lrs) > 0.5 * peak, lrs
    # the schedule's value after the last step, read when the budget was spent: about 0
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["lr_schedulers"][0]["_last_lr"][0] < 0.05 * peak
    assert lrs.index(max(lrs)) < len(lrs) * 0.5, "the peak comes early (after the warmup share of the time)"


def reference_lamb_step(params, states, lr, betas, eps, weight_decay):
    """LAMB one tensor at a time, as bertpre computed it before the multi-tensor version."""
    beta1, beta2 = betas
    for p, state in zip(params, states):
        state["step"] = state.get("step", 0) + 1
        m = state.setdefault("m", torch.zeros_like(p))
        v = state.setdefault("v", torch.zeros_like(p))
        m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        update = (m / (1 - beta1 ** state["step"])) / ((v / (1 - beta2 ** state["step"])).sqrt() + eps)
        if weight_decay:
            update.add_(p, alpha=weight_decay)
        weight_norm, update_norm = p.norm(), update.norm()
        ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
        p.sub_(lr * ratio * update)


def test_multi_tensor_lamb_equals_the_per_tensor_rule():
    torch.manual_seed(0)
    model = BertForPretraining(BertConfig.from_preset("bert-tiny", vocab_size=100))
    reference = [p.detach().clone() for p in model.parameters()]
    reference[0].zero_()  # a zero tensor: trust ratio 1
    with torch.no_grad():
        next(model.parameters()).zero_()
    optimizer = Lamb(model.parameters(), lr=6e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    states = [{} for _ in reference]
    for step in range(5):
        grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(step * 1000 + i))
                 for i, p in enumerate(reference)]
        for p, r, g in zip(model.parameters(), reference, grads):
            p.grad, r.grad = g.clone(), g.clone()
        optimizer.step()
        with torch.no_grad():
            reference_lamb_step(reference, states, 6e-3, (0.9, 0.999), 1e-6, 0.01)
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-6)


def test_the_share_of_a_run_is_that_of_the_budget_that_ends_it_first():
    """The schedule (when trainer.max_time is set beside max_steps) and the plateau check read the
    share of the run done as the larger of the steps' and the clock's shares."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    class Clock(Timer):
        def __init__(self, elapsed, remaining):
            super().__init__(duration="00:00:01:00")
            self.elapsed, self.remaining = elapsed, remaining

        def time_elapsed(self, stage="train"):
            return self.elapsed

        def time_remaining(self, stage="train"):
            return self.remaining

    module = PretrainModule(BertConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16))
    for steps, clock, share in ((100, Clock(30, 30), 0.5), (100, None, 0.01), (-1, Clock(15, 45), 0.25),
                                (100, Clock(3, 57), 0.05)):
        trainer = SimpleNamespace(max_steps=steps, global_step=1, callbacks=[clock] if clock else [])
        module._trainer = trainer
        assert module._run_share() == pytest.approx(share)
