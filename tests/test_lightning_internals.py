"""The two places where bertpre relies on Lightning's private API (bertpre/lightning_cli.py). A
Lightning release that renames or changes either fails here, naming what bertpre assumed,
instead of silently changing what `bertpre train` does."""

import inspect

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from bertpre.lightning_cli import BertpreCLI


def test_lightning_still_reads_ckpt_path_hyperparameters_in_parse_ckpt_path_before_instantiating():
    # BertpreCLI._parse_ckpt_path wraps this method: it turns a damaged checkpoint into one line and
    # keeps the command line's model options over the checkpoint's hyperparameters
    assert "_parse_ckpt_path" in vars(LightningCLI), "LightningCLI no longer has _parse_ckpt_path"
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]
    source = inspect.getsource(LightningCLI._parse_ckpt_path)
    assert "hyper_parameters" in source and "self.config" in source, \
        "_parse_ckpt_path no longer puts ckpt_path's hyperparameters into self.config"
    init = inspect.getsource(LightningCLI.__init__)
    assert init.index("self._parse_ckpt_path()") < init.index("self.instantiate_classes()"), \
        "LightningCLI no longer parses ckpt_path before it instantiates the classes"
    assert BertpreCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


def test_model_checkpoint_still_keeps_its_version_counter_switch_in_enable_version_counter():
    # BertpreCLI switches it off on every ModelCheckpoint so that last.ckpt is always the newest
    # (no last-v1.ckpt beside a stale last.ckpt)
    for value in (True, False):
        assert ModelCheckpoint(enable_version_counter=value)._enable_version_counter is value
    source = inspect.getsource(ModelCheckpoint)
    # set in __init__ and read where a checkpoint's name is chosen
    assert source.count("self._enable_version_counter") >= 2, "ModelCheckpoint no longer reads _enable_version_counter"
