from dataclasses import replace

import pytest
from conftest import ROOT

from bertpre.data.datamodule import PretrainDataModule
from bertpre.lightning_cli import BertpreCLI
from bertpre.model.bert import PRESETS
from bertpre.training.pretraining import PretrainModule

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("finetune-"))


def test_the_expected_configs_ship():
    names = {p.stem for p in CONFIGS}
    assert set(PRESETS) | {"bert-base-phase2", "bert-large-multinode", "bert-mini-cpu", "bert-mini-zh-cpu",
                             "quickstart"} == names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_parses_and_matches_its_preset(path, tmp_path):
    cli = BertpreCLI(PretrainModule, PretrainDataModule, run=False,
                     args=["--config", str(path), "--trainer.default_root_dir", str(tmp_path)])
    model = cli.model
    assert isinstance(model, PretrainModule) and isinstance(cli.datamodule, PretrainDataModule)
    preset = PRESETS["bert-mini" if path.stem == "quickstart" else
                     path.stem.removesuffix("-phase2").removesuffix("-multinode").removesuffix("-cpu").removesuffix("-zh")]
    recipe = {"hidden_dropout", "attention_dropout", "position_init", "norm_placement"}  # training choices
    shape = {f: getattr(preset, f) for f in preset.__dataclass_fields__ if f not in recipe}
    assert {f: getattr(replace(model.config, vocab_size=None), f) for f in shape} == shape
    if cli.trainer.max_steps > 0:
        assert model.schedule_by == "steps"
    else:  # a time budget: the schedule must span it, or the run would stop mid-warmup
        assert model.schedule_by == "time" and cli.config["trainer"]["max_time"]
    assert 0 < model.learning_rate <= (6e-3 if model.optimizer_name == "lamb" else 1e-3)
    assert cli.trainer.gradient_clip_val == 1.0
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")
    if path.stem.endswith("phase2"):
        assert model.init_from and cli.datamodule.path.endswith("-512")


def test_multinode_config_uses_lamb_on_32_gpus(tmp_path):
    cli = BertpreCLI(PretrainModule, PretrainDataModule, run=False,
                     args=["--config", str(ROOT / "configs" / "bert-large-multinode.yaml"),
                           "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu"])
    assert cli.model.optimizer_name == "lamb" and cli.trainer.num_nodes == 4
    assert cli.datamodule.batch_size * 8 * 4 * cli.trainer.accumulate_grad_batches == 32768
