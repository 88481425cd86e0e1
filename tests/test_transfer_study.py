"""The transfer study reuses runs only when they are comparable, and a task's text becomes a corpus."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

SST2_TRAIN = ROOT.parent / "shared" / "data" / "tasks" / "sst2" / "train.tsv"


def run_script(path: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / path), *argv], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # 20-50 s on this 2-core machine; in CI's slow run
def test_task_text_keeps_every_sentence_and_drops_the_labels(tmp_path):
    rows = SST2_TRAIN.read_text(encoding="utf-8").splitlines()[:51]  # header + 50 sentences
    task = tmp_path / "task.tsv"
    task.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "corpus" / "train.txt"
    done = run_script("data_prep/task_text.py", str(task), "--output", str(out), "--sentences-per-document", "8")
    assert done.returncode == 0, done.stderr
    documents = [d.splitlines() for d in out.read_text(encoding="utf-8").split("\n\n") if d]
    assert [len(d) for d in documents] == [8] * 6 + [2]
    assert sum(documents, []) == [" ".join(r.split("\t", 1)[1].split()) for r in rows[1:]]
    assert not any(line.startswith(("0\t", "1\t")) for d in documents for line in d)

    again = run_script("data_prep/task_text.py", str(task), "--output", str(out))
    assert again.returncode != 0 and "exists" in again.stderr and out.read_text(encoding="utf-8").count("\n\n") == 7
    wrong = run_script("data_prep/task_text.py", str(task), "--output", str(tmp_path / "other.txt"), "--column", "text")
    assert wrong.returncode != 0 and "no column 'text'" in wrong.stderr and "sentence" in wrong.stderr


def study_results(path: Path, checkpoint: str, runs: list[tuple[float, int, bool]], examples: int = 2000) -> Path:
    options = {"checkpoint": checkpoint, "train": "t.tsv", "dev": "d.tsv", "examples": str(examples), "epochs": "5"}
    path.write_text(json.dumps({"checkpoint": checkpoint, "options": options, "runs": [
        {"run": f"r{i}", "seed": seed, "random_init": random_init, "learning_rate": lr, "final_accuracy": 0.7,
         "best_accuracy": 0.7, "seconds": 1.0} for i, (lr, seed, random_init) in enumerate(runs)]}))
    return path


def test_resume_runs_only_what_the_earlier_study_lacks_and_refuses_other_options(tmp_path):
    from argparse import Namespace

    from studies.transfer_study import planned, previous_runs

    results = study_results(tmp_path / "results.json", "a.ckpt", [(3e-4, 0, False), (3e-4, 0, True), (3e-4, 1, False)])
    options = {"checkpoint": "a.ckpt", "train": "t.tsv", "dev": "d.tsv", "examples": "2000", "epochs": "5",
               "pooling": "cls", "dropout": "null"}
    kept = previous_runs(results, options, ("checkpoint",))
    args = Namespace(learning_rates=[3e-4], seeds=[0, 1, 2])
    assert planned(args, kept) == [(3e-4, 1, True), (3e-4, 2, False), (3e-4, 2, True)]
    assert planned(args, []) == [(3e-4, s, r) for s in (0, 1, 2) for r in (False, True)]
    assert previous_runs(tmp_path / "none.json", options, ("checkpoint",)) == []  # nothing to resume yet

    for key, value in (("examples", "500"), ("checkpoint", "b.ckpt")):
        with pytest.raises(SystemExit, match=f"with {key} .*cannot be reused"):
            previous_runs(results, {**options, key: value}, ("checkpoint",))
    with pytest.raises(SystemExit, match="not found"):
        previous_runs(tmp_path / "none.json", options, ())  # --random-from must name a study that exists
    # a study written before --reinit-pooler existed ran without it
    assert previous_runs(results, {**options, "reinit_pooler": "False"}, ("checkpoint", "reinit_pooler")) == kept
    with pytest.raises(SystemExit, match="with reinit_pooler False"):
        previous_runs(results, {**options, "reinit_pooler": "True"}, ("checkpoint", "reinit_pooler"))
    # ... and before --pooling, with the [CLS] vector: its random-init runs are not a mean-pooling study's
    with pytest.raises(SystemExit, match="with pooling cls, this study with mean"):
        previous_runs(results, {**options, "pooling": "mean"}, ())
    # ... and before --dropout, with the encoder's own rate ("null", as kept above): not fine-tuning at 0.1
    with pytest.raises(SystemExit, match="with dropout null, this study with 0.1"):
        previous_runs(results, {**options, "dropout": "0.1"}, ())
    # ... and before --layer-lr-decay and --reinit-layers, with neither
    assert previous_runs(results, {**options, "reinit_layers": "0", "layer_lr_decay": "1.0"},
                         ("checkpoint", "reinit_layers", "layer_lr_decay")) == kept
    with pytest.raises(SystemExit, match="with layer_lr_decay 1.0, this study with 0.8"):
        previous_runs(results, {**options, "layer_lr_decay": "0.8"}, ("checkpoint", "layer_lr_decay"))
    # the pretrained side's options do not stop borrowing its random-init runs
    assert previous_runs(results, {**options, "layer_lr_decay": "0.8", "reinit_layers": "1"}, ()) == kept
    with pytest.raises(SystemExit, match="with reinit_layers 0, this study with 1"):
        previous_runs(results, {**options, "reinit_layers": "1"}, ("checkpoint", "reinit_layers"))


def test_dropout_option_is_a_rate_or_the_encoders():
    from argparse import ArgumentTypeError

    from studies.transfer_study import dropout_rate

    assert dropout_rate("0.1") == "0.1" and dropout_rate("0") == "0.0" and dropout_rate("encoder") == "null"
    for bad in ("1", "-0.1", "ten"):
        with pytest.raises(ArgumentTypeError, match="a rate in \\[0, 1\\) or 'encoder'"):
            dropout_rate(bad)


def test_random_init_runs_are_borrowed_only_from_the_same_architecture_and_tokenizer(sample_checkpoint, tmp_path):
    from studies.transfer_study import same_start

    same_start(sample_checkpoint, sample_checkpoint, fixed_dropout=False)  # the same start: accepted

    def changed(name: str, key: str, value) -> Path:
        checkpoint = torch.load(sample_checkpoint, map_location="cpu", weights_only=True)
        checkpoint["bertpre"]["model_config"][key] = value
        torch.save(checkpoint, tmp_path / name)
        return tmp_path / name

    deeper = changed("deeper.ckpt", "num_layers", 3)
    for fixed_dropout in (False, True):
        with pytest.raises(SystemExit, match="another model config"):
            same_start(sample_checkpoint, deeper, fixed_dropout=fixed_dropout)
    # pretrained with dropout 0.1 (continued pretraining): the runs share a fixed fine-tuning rate, not the encoder's
    regularised = changed("dropout.ckpt", "hidden_dropout", 0.1)
    same_start(sample_checkpoint, regularised, fixed_dropout=True)
    with pytest.raises(SystemExit, match="another model config"):
        same_start(sample_checkpoint, regularised, fixed_dropout=False)


@pytest.mark.slow
def test_the_transfer_study_borrows_random_runs_and_resumes(sample_checkpoint, tmp_path):
    """End to end on real SST-2 rows: the random-init run of seed 0 comes from the earlier study,
    the pretrained one is fine-tuned; a resumed study with seed 1 added runs only seed 1's two."""
    header, *rows = SST2_TRAIN.read_text(encoding="utf-8").splitlines()
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("\n".join([header, *rows[:200]]) + "\n", encoding="utf-8")
    dev.write_text("\n".join([header, *rows[200:260]]) + "\n", encoding="utf-8")
    common = ["--train", str(train), "--dev", str(dev), "--examples", "64", "--epochs", "1",
              "--learning-rates", "3e-4", "--runs", str(tmp_path / "runs")]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    options = {"checkpoint": str(sample_checkpoint), "train": str(train), "dev": str(dev), "examples": "64",
               "epochs": "1", "dropout": "0.1"}
    (earlier / "results.json").write_text(json.dumps({"checkpoint": str(sample_checkpoint), "options": options,
                                                      "runs": [{"run": "random-lr0.0003-0", "seed": 0,
                                                                "random_init": True, "learning_rate": 3e-4,
                                                                "final_accuracy": 0.123, "best_accuracy": 0.123,
                                                                "seconds": 1.0}]}))
    out = tmp_path / "study"
    first = run_script("studies/transfer_study.py", str(sample_checkpoint), "--output", str(out), "--seeds", "0",
                       "--random-from", str(earlier / "results.json"), *common)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["seed"], r["random_init"]) for r in runs] == [(0, False), (0, True)]
    assert runs[1]["final_accuracy"] == 0.123 and runs[1]["from"] == str(earlier / "results.json")
    assert 0 <= runs[0]["final_accuracy"] <= 1 and (tmp_path / "runs" / "pretrained-lr0.0003-0").is_dir()

    second = run_script("studies/transfer_study.py", str(sample_checkpoint), "--output", str(out), "--seeds", "0", "1",
                        "--resume", *common)
    assert second.returncode == 0, second.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["seed"], r["random_init"]) for r in runs] == [(0, False), (0, True), (1, False), (1, True)]
    assert not (tmp_path / "runs" / "random-lr0.0003-0").exists()  # seed 0's random run was never made
    assert "mean of 2" in (out / "table.md").read_text()
