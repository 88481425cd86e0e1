"""A newcomer's first hour, end to end, as the README and docs/checkpoints.md write it:
prepare -> train -> export -> finetune -> export of the classifier -> transformers'
text-classification pipeline -> predict --scores. Each step is the documented command (in a
subprocess, as a user runs it), shortened only in steps and data."""

import csv
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE, SHARED_DATA


def bertpre(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "bertpre.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"bertpre {' '.join(args)}:\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_newcomer_path_runs_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    sst2 = SHARED_DATA / "tasks" / "sst2"
    if not sst2.is_dir():
        pytest.skip("../shared/data is not present")
    (tmp_path / "train.tsv").write_text("".join((sst2 / "train.tsv").read_text().splitlines(True)[:401]))
    (tmp_path / "dev.tsv").write_text("".join((sst2 / "dev.tsv").read_text().splitlines(True)[:101]))
    bertpre("prepare", "--input", str(SAMPLE), "--output", "out/sample", "--vocab-size", "8192", "--overwrite",
            cwd=tmp_path)
    out = bertpre("train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--trainer.max_steps", "30",
                  "--trainer.val_check_interval", "15", cwd=tmp_path)
    assert "30/30" in out and "Tip:" not in out and "Total FLOPs" not in out and "Epoch" not in out
    pretrained = tmp_path / "runs" / "bert-tiny" / "checkpoints" / "last.ckpt"
    bertpre("export", str(pretrained), "--output", "out/bert-tiny-hf", cwd=tmp_path)
    assert transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "out" / "bert-tiny-hf") is not None
    bertpre("finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained",
            str(pretrained), "--data.train_file", "train.tsv", "--data.validation_file", "dev.tsv",
            "--trainer.max_epochs", "1", cwd=tmp_path)
    finetuned = tmp_path / "runs" / "sst2" / "checkpoints" / "last.ckpt"
    bertpre("export", str(finetuned), "--output", "out/sst2-hf", cwd=tmp_path)
    classify = transformers.pipeline("text-classification", model=str(tmp_path / "out" / "sst2-hf"))
    [answer] = classify("a gorgeous , witty , seductive movie .")
    assert answer["label"] in ("0", "1") and 0 <= answer["score"] <= 1
    bertpre("predict", "--checkpoint", str(finetuned), "--input", "dev.tsv", "--output", "predictions.tsv",
            "--scores", cwd=tmp_path)
    rows = list(csv.DictReader((tmp_path / "predictions.tsv").open(), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == 100 and all(abs(float(r["p_0"]) + float(r["p_1"]) - 1) < 1e-5 for r in rows)
    [answer] = classify(rows[0]["content"])  # pipeline and predict agree
    assert abs(float(rows[0][f"p_{answer['label']}"]) - answer["score"]) < 1e-5
