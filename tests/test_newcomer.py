"""A newcomer's first hour, end to end, as the README and docs/checkpoints.md write it:
prepare -> train -> export -> finetune -> export of the classifier -> transformers'
text-classification pipeline -> predict --scores. Each step is the documented command (in a
subprocess, as a user runs it), shortened only in steps and data."""

import csv
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA


def readme_quickstart() -> list[list[str]]:
    """The quickstart's commands, as the README writes them (its code block after the set-up)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(bertpre prepare .*?)```", text, re.S)
    assert block, "README.md has no quickstart block starting with `bertpre prepare`"
    return [shlex.split(line)[1:] for line in block[1].strip().splitlines()]


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
    prepare, train = readme_quickstart()
    assert prepare[0] == "prepare" and train[:3] == ["train", "--config", "configs/quickstart.yaml"]
    for link in ("data_prep", "configs"):  # the README's relative paths, from the run folder
        (tmp_path / link).symlink_to(ROOT / link)
    bertpre(*prepare, cwd=tmp_path)
    out = bertpre(*train, "--trainer.max_steps", "30", "--trainer.val_check_interval", "15", cwd=tmp_path)
    assert "30/30" in out and "Tip:" not in out and "Total FLOPs" not in out and "Epoch" not in out
    assert (tmp_path / "runs" / "quickstart" / "logs" / "version_0" / "curves.png").is_file()
    pretrained = tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    bertpre("export", str(pretrained), "--output", "out/quickstart-hf", cwd=tmp_path)
    assert transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "out" / "quickstart-hf") is not None
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
