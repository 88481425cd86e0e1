from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch  # noqa: F401  (bind Lightning's log handler to the session's stderr, not one test's)
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_prep" / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"
GUTENBERG = SHARED_DATA / "corpora" / "gutenberg"
WIKITEXT = SHARED_DATA / "corpora" / "wikitext-2"


def gutenberg_books() -> list[str]:
    if not GUTENBERG.is_dir():
        pytest.skip("../shared/data is not present")
    return [str(p) for p in sorted(GUTENBERG.glob("*-*.txt"))]


@pytest.fixture(scope="session")
def gutenberg_prepared(tmp_path_factory) -> Path:
    """The whole shared gutenberg corpus (15 books, 10.4 MB of raw prose) prepared at seq 128."""
    from bertpre.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("gutenberg") / "prepared"
    prepare(PrepareOptions(inputs=gutenberg_books(), output=out, vocab_size=8192))
    return out


@pytest.fixture(scope="session")
def sample_prepared(tmp_path_factory) -> Path:
    """The bundled sample, small vocabulary and seq 64: quick to train on."""
    from bertpre.data.pairs import PairOptions
    from bertpre.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("sample") / "prepared"
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=out, vocab_size=2000, pairs=PairOptions(max_seq_length=64)))
    return out


@pytest.fixture(scope="session")
def sample_checkpoint(sample_prepared, tmp_path_factory) -> Path:
    """A bert-tiny checkpoint after 10 steps on the bundled sample."""
    from bertpre.cli import main

    run = tmp_path_factory.mktemp("pretrained")
    main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
          "--trainer.default_root_dir", str(run), "--trainer.max_steps", "10", "--trainer.enable_progress_bar",
          "false", "--trainer.limit_val_batches", "0"])
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def finetuned_checkpoint(sample_checkpoint, tmp_path_factory) -> Path:
    """A classifier fine-tuned for 10 steps from ``sample_checkpoint`` on 160 SST-2 rows (labels '0', '1')."""
    from bertpre.cli import main

    sst2 = SHARED_DATA / "tasks" / "sst2"
    if not sst2.is_dir():
        pytest.skip("../shared/data is not present")
    run = tmp_path_factory.mktemp("finetuned")
    main(["finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained",
          str(sample_checkpoint), "--data.train_file", str(sst2 / "train.tsv"), "--data.validation_file",
          str(sst2 / "dev.tsv"), "--data.max_train_examples", "160", "--data.batch_size", "16",
          "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(run),
          "--trainer.enable_progress_bar", "false"])
    return run / "checkpoints" / "last.ckpt"


def gradient_poison(step: int, parameter, value: float):
    """A callback that writes ``value`` into one gradient entry of ``parameter(module)`` after
    the backward pass of ``step`` (0-based) and keeps the module's state before and after
    that step's optimizer step in ``.before`` / ``.after``."""
    import lightning as L

    class GradientPoison(L.Callback):
        before: dict | None = None
        after: dict | None = None

        def on_after_backward(self, trainer, module):
            if trainer.global_step == step and self.before is None:
                self.before = {k: v.clone() for k, v in module.state_dict().items()}
                parameter(module).grad.view(-1)[0] = value

        def on_train_batch_end(self, trainer, module, *args):
            if self.before is not None and self.after is None:
                self.after = {k: v.clone() for k, v in module.state_dict().items()}

    return GradientPoison()


def fake_gpus(monkeypatch, gpus: int, cuda: str | None = "12.8", hip: str | None = None, visible: str | None = None,
              capability: tuple[int, int] = (9, 0), name: str = "NVIDIA H100 80GB HBM3"):
    """What torch reports about GPUs, set for one test: ``gpus`` visible, each a ``name`` of compute
    ``capability``, the build's CUDA (or ROCm) version; bf16 tensors can be made on any of them (emulated
    before capability 8.0, as on a real V100 or T4)."""
    from types import SimpleNamespace

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        name=name, major=capability[0], minor=capability[1], total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
