"""Refactors change no maths: a fixed-seed 50-step pretraining run and a 50-step fine-tuning run
from it reproduce the per-step training losses recorded in tests/golden/loss_curves.json.

The reference was written by this file (``python tests/training/test_loss_identity.py --write``) before
the restructuring it guards; rewrite it only for a change that is meant to alter the maths, and
say so in the commit.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "loss_curves.json"
SST2 = ROOT.parent / "shared" / "data" / "tasks" / "sst2"
STEPS = 50


def _losses(run: Path) -> list[float]:
    rows = list(csv.DictReader(next(run.glob("logs/version_*/metrics.csv")).open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


# bert-tiny.yaml's recipe when the reference was recorded (the config has since taken the CPU recipe)
QUICKSTART_RECIPE_WHEN_RECORDED = [
    "--model.config.hidden_dropout", "0.1", "--model.config.attention_dropout", "0.1",
    "--model.adam_betas", "[0.9, 0.999]", "--model.warmup_fraction", "0.05", "--model.lr_schedule", "linear",
    "--data.mlm_probability", "0.15",
]


def loss_curves(workdir: Path) -> dict[str, list[float]]:
    from bertpre.cli import main
    from bertpre.data.pairs import PairOptions
    from bertpre.data.prepare import PrepareOptions, prepare

    data = workdir / "data"
    prepare(PrepareOptions(inputs=[str(ROOT / "data_prep" / "sample")], output=data, vocab_size=2000,
                           pairs=PairOptions(max_seq_length=64), num_proc=1))
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
             "--trainer.limit_val_batches", "0"]
    main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(data),
          "--trainer.default_root_dir", str(workdir / "pretrain"), "--trainer.max_steps", str(STEPS),
          "--data.batch_size", "16", "--trainer.accelerator", "cpu", *QUICKSTART_RECIPE_WHEN_RECORDED, *quiet])
    main(["finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"),
          "--model.pretrained", str(workdir / "pretrain" / "checkpoints" / "last.ckpt"),
          "--data.train_file", str(SST2 / "train.tsv"), "--data.validation_file", str(SST2 / "dev.tsv"),
          "--data.max_train_examples", str(16 * STEPS), "--data.batch_size", "16", "--trainer.max_epochs", "1",
          "--model.learning_rate", "5e-5",  # the config's rate when the reference was recorded (now set by size)
          "--trainer.default_root_dir", str(workdir / "finetune"), "--trainer.accelerator", "cpu", *quiet])
    return {"pretrain": _losses(workdir / "pretrain"), "finetune": _losses(workdir / "finetune")}


@pytest.mark.slow
def test_loss_curves_are_unchanged(tmp_path):
    if not SST2.is_dir():
        pytest.skip("../shared/data is not present")
    reference = json.loads(GOLDEN.read_text())
    measured = loss_curves(tmp_path)
    for name in ("pretrain", "finetune"):
        assert len(measured[name]) == len(reference[name]) == STEPS
        worst = max(abs(a - b) for a, b in zip(measured[name], reference[name]))
        assert worst <= 1e-5, f"{name}: a loss moved by {worst:.2e} (first steps {measured[name][:3]})"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        curves = loss_curves(Path(tmp))
    GOLDEN.write_text(json.dumps(curves, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {', '.join(f'{k} {len(v)} steps' for k, v in curves.items())}")
