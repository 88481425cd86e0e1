"""The GPU configs' settings, run on CPU: every shipped config trains a few steps with its own
optimizer, clipping, precision and accumulation, and with the AdamW kernel it would use on
CUDA (fused), so that nothing on the CUDA path is first run on a GPU."""

import pytest
import torch
import yaml
from conftest import ROOT

from bertpre.cli import main

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("finetune-"))
# (config, precision override): each config at its own precision, and the two big recipes under 16-mixed
# too (a GradScaler, whose unscaling is where fused AdamW and clipping collide)
CASES = [(p, None) for p in CONFIGS] + [(ROOT / "configs" / "bert-base.yaml", "16-mixed"),
                                         (ROOT / "configs" / "bert-large-multinode.yaml", "16-mixed")]


def small_run_args(config, data, run, steps: int = 3) -> list[str]:
    """The config as shipped, on a model small enough for CPU and one process; everything that
    is not size or placement (optimizer, schedule, clipping, precision, accumulation) as shipped."""
    return ["train", "--config", str(config), "--data.path", str(data), "--trainer.default_root_dir", str(run),
            "--model.config.hidden_size", "32", "--model.config.num_layers", "1", "--model.config.num_heads", "2",
            "--model.config.intermediate_size", "64", "--model.init_from", "null", "--model.compile", "false",
            "--model.optimizer_implementation", "fused", "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.max_steps", str(steps), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.num_nodes", "1", "--trainer.strategy", "auto", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("config, precision", CASES,
                         ids=[p.stem + (f"-{q}" if q else "") for p, q in CASES])
def test_every_shipped_config_trains_on_cpu_with_its_cuda_settings(config, precision, sample_prepared, tmp_path,
                                                                   capsys):
    shipped = yaml.safe_load(config.read_text())
    assert shipped["trainer"]["gradient_clip_val"] > 0, "every config clips: the path that crashed with fused AdamW"
    run = tmp_path / "run"
    args = small_run_args(config, sample_prepared, run)
    if precision == "16-mixed":  # Lightning turns 16-mixed into bf16-mixed on CPU: inject CUDA's plugin instead
        overlay = tmp_path / "fp16.yaml"
        overlay.write_text(yaml.safe_dump({"trainer": {"precision": None, "plugins": [
            {"class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
             "init_args": {"precision": "16-mixed", "device": "cpu"}}]}}))
        args += ["--config", str(overlay)]
    main(args)
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "non-finite" not in out
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["hyper_parameters"]["optimizer_implementation"] == "fused"
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    if shipped["model"].get("optimizer", "adamw") == "adamw":
        assert group["fused"] is True, "the fused kernel, as on CUDA"
    if precision == "16-mixed":
        assert checkpoint["MixedPrecision"]["scale"] > 0, "a GradScaler ran"


def test_clipping_a_fused_adamw_under_a_grad_scaler_clips_the_true_gradients():
    """Scaled gradients are unscaled before the clip; the update equals fp32's clipped update."""
    from bertpre.training.optim import clip_gradients

    def model_and_loss():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        return model, model(x).pow(2).mean() * 100  # large gradients: the clip binds

    reference, loss = model_and_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    torch.optim.AdamW(reference.parameters(), lr=0.1, fused=True).step()

    model, loss = model_and_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss).backward()
    clip_gradients(optimizer, 0.1, "norm", scaler)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert norm <= 0.1 + 1e-6, "the threshold applies to the unscaled gradients"
    scaler.step(optimizer)
    scaler.update()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_a_grad_scaler_overflow_is_not_a_non_finite_step(sample_prepared, tmp_path, capsys):
    """Under 16-mixed an inf gradient is an overflow: the GradScaler skips that step and lowers its
    scale; bertpre's guard must not count it (with nonfinite: stop it used to end the run)."""
    import lightning as L
    from conftest import gradient_poison
    from lightning.pytorch.plugins.precision import MixedPrecision

    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    poison = gradient_poison(1, lambda module: next(module.model.parameters()), float("inf"))
    module = PretrainModule(BertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                            nonfinite="stop", optimizer_implementation="fused")
    plugin = MixedPrecision("16-mixed", "cpu")
    trainer = L.Trainer(max_steps=4, callbacks=[poison], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                        plugins=[plugin], gradient_clip_val=1.0, accelerator="cpu")
    scale = plugin.scaler.get_scale()
    data = PretrainDataModule(str(sample_prepared), batch_size=4)
    connect(module, data)
    trainer.fit(module, data)
    assert trainer.global_step == 4 and "non-finite" not in capsys.readouterr().out
    assert all(torch.equal(poison.before[k], poison.after[k]) for k in poison.before), "the scaler skipped the step"
    assert plugin.scaler.get_scale() < scale and module.nonfinite_guard.skipped == []


def test_micro_batches_of_one_step_draw_different_dropout(sample_prepared, tmp_path):
    """Dropout is reseeded per step for exact resumes; under gradient accumulation each micro-batch
    of a step must still get its own masks."""
    import lightning as L

    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    seeds = []

    class RecordSeed(L.Callback):
        def on_before_backward(self, trainer, module, loss):
            seeds.append((trainer.global_step, torch.initial_seed()))

    module = PretrainModule(BertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=3, callbacks=[RecordSeed()], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0, accelerator="cpu")
    data = PretrainDataModule(str(sample_prepared), batch_size=4)
    connect(module, data)
    trainer.fit(module, data)
    assert [step for step, _ in seeds] == [0, 0, 0, 1, 1, 1]
    assert len({seed for _, seed in seeds}) == 6, seeds


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_a_non_finite_loss_under_a_grad_scaler_is_skipped_without_a_crash(sample_prepared, tmp_path, capsys,
                                                                          implementation):
    """16-mixed + nonfinite: skip + a non-finite loss: the guard used to drop every gradient, so with fused
    AdamW (which unscales inside its own step) the GradScaler recorded no inf check and its update()
    raised. Now that step is skipped (weights unchanged), the run goes on, and the loss is reported."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    class LossPoison(L.Callback):
        """At step 1 the loss the guard checks is NaN (what an fp16 overflow in the forward pass gives)."""
        before = after = None

        def on_after_backward(self, trainer, module):
            if trainer.global_step == 1 and self.before is None:
                self.before = {k: v.clone() for k, v in module.state_dict().items()}
                module.nonfinite_guard.loss = torch.tensor(float("nan"))

        def on_train_batch_end(self, trainer, module, *args):
            if self.before is not None and self.after is None:
                self.after = {k: v.clone() for k, v in module.state_dict().items()}

    poison = LossPoison()
    module = PretrainModule(BertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                            nonfinite="skip", optimizer_implementation=implementation)
    plugin = MixedPrecision("16-mixed", "cpu")
    trainer = L.Trainer(max_steps=4, callbacks=[poison], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                        plugins=[plugin], gradient_clip_val=1.0, accelerator="cpu")
    data = PretrainDataModule(str(sample_prepared), batch_size=4)
    connect(module, data)
    trainer.fit(module, data)
    assert trainer.global_step == 4
    assert module.nonfinite_guard.skipped == [2] and "step 2: non-finite loss nan" in capsys.readouterr().out
    weights = [k for k in poison.before if k.startswith("model.")]
    assert all(torch.equal(poison.before[k], poison.after[k]) for k in weights), "the skipped step changed weights"
    assert all(torch.isfinite(p).all() for p in module.parameters())
