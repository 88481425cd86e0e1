"""The diagnostic scripts behind the README's "Does pretraining help?" figures."""

import importlib
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA

SST2 = SHARED_DATA / "tasks" / "sst2"


def load_script(name: str):
    return importlib.import_module(f"studies.{name}")


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "studies" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_logistic_regression_separates_what_is_separable_and_not_noise():
    probe = load_script("linear_probe")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(800, 16, generator=generator)
    direction = torch.randn(16, generator=generator)
    y = (x @ direction > 0).long()
    assert probe.logistic_regression_accuracy(x[:600], y[:600], x[600:], y[600:], c=1.0) >= 0.95
    noise = torch.randint(0, 2, (800,), generator=generator)
    assert abs(probe.logistic_regression_accuracy(x[:600], noise[:600], x[600:], noise[600:], c=0.1) - 0.5) < 0.12


@pytest.mark.slow  # 30-60 s on this 2-core machine; in CI's slow run
def test_linear_probe_script_reports_each_feature(sample_checkpoint, tmp_path):
    if not SST2.is_dir():
        pytest.skip("../shared/data is not present")
    (tmp_path / "train.tsv").write_text("".join((SST2 / "train.tsv").read_text().splitlines(True)[:301]))
    (tmp_path / "dev.tsv").write_text("".join((SST2 / "dev.tsv").read_text().splitlines(True)[:101]))
    out = run_script("linear_probe", str(sample_checkpoint), str(tmp_path / "train.tsv"), str(tmp_path / "dev.tsv"),
                     "--train-examples", "200", "--random-init")
    found = re.findall(r"random init  200 examples  (.+?) +validation accuracy (\d\.\d+)", out)
    assert [name for name, _ in found] == ["cls", "pooled", "mean hidden", "mean embedding"], out
    assert all(0.0 <= float(accuracy) <= 1.0 for _, accuracy in found)


@pytest.mark.slow  # 15 s of study-script start-up on this 2-core machine; in CI's slow run
def test_context_probe_script_reports_both_accuracies(sample_checkpoint, sample_prepared):
    out = run_script("mlm_context_probe", str(sample_checkpoint), str(sample_prepared), "--batches", "2")
    accuracies = dict(re.findall(r"MLM accuracy, (context|random context) +(\d\.\d+)   perplexity \d+", out))
    assert set(accuracies) == {"context", "random context"}, out
    assert re.search(r"most frequent token +\d\.\d+ +\(\d+ masked tokens\)", out), out
    assert re.search(r"unigram perplexity +\d+\.\d", out), out
    assert re.search(r"mean cosine [+-]\d\.\d{3} .* correlation with log frequency [+-]\d\.\d\d", out), out


@pytest.mark.slow  # two study scripts in subprocesses, 8 s of imports here; in CI's slow run
def test_scripts_report_bad_input_in_one_line(tmp_path):
    scripts = [subprocess.Popen([sys.executable, str(ROOT / "studies" / f"{name}.py"), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in (("linear_probe", (str(tmp_path / "missing.ckpt"), "train.tsv", "dev.tsv")),
                                  ("mlm_context_probe", (str(tmp_path / "missing.ckpt"), str(tmp_path))))]
    for script in scripts:  # started together: most of each one's time is importing torch
        _, stderr = script.communicate(timeout=120)
        assert script.returncode == 1, script.args
        assert stderr.strip().splitlines()[-1] == f"error: checkpoint {tmp_path / 'missing.ckpt'}: not found"
        assert "Traceback" not in stderr


@pytest.mark.slow  # a study script in a subprocess, 9 s here; in CI's slow run
def test_context_probe_random_init_baseline_has_isotropic_embeddings(sample_checkpoint, sample_prepared):
    out = run_script("mlm_context_probe", str(sample_checkpoint), str(sample_prepared), "--batches", "1",
                     "--random-init", "--neighbours", "the", "qwertyuiop")
    assert re.search(r"neighbours of 'the': ('[^']+', ){5}'[^']+'\n", out), out
    assert "neighbours of 'qwertyuiop': not a single token of the vocabulary" in out
    cosine, correlation = re.search(r"mean cosine ([+-]\d\.\d{3}) .* log frequency ([+-]\d\.\d\d)", out).groups()
    assert abs(float(cosine)) < 0.02 and abs(float(correlation)) < 0.15, out


@pytest.mark.slow  # a study script in a subprocess, 7 s here; in CI's slow run
def test_context_probe_refuses_data_of_another_vocabulary(sample_checkpoint, gutenberg_prepared):
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "mlm_context_probe.py"), str(sample_checkpoint),
                           str(gutenberg_prepared)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {sample_checkpoint} was trained with another vocabulary than {gutenberg_prepared}'s tokenizer")


@pytest.mark.slow  # 15 s of study-script start-up on this 2-core machine; in CI's slow run
def test_peer_learning_curve_starts_from_the_same_loss(sample_prepared):
    out = run_script("peer_learning_curve", str(sample_prepared), "--steps", "2", "--batch-size", "8", "--window", "1",
                     "--preset", "bert-tiny", "--precision", "32", "--warmup-steps", "1", "--schedule-steps", "2")
    first, second = re.findall(r"^ +\d+-\d+ +(\d+\.\d+) +(\d+\.\d+)$", out, flags=re.MULTILINE)
    assert abs(float(first[0]) - float(first[1])) < 1e-3, out  # same weights, same batch: same loss
    assert abs(float(second[0]) - float(second[1])) < 1e-2, out  # after the same optimizer step, still alike


def test_linear_probe_names_a_missing_label_column(sample_checkpoint):
    if not SST2.is_dir():
        pytest.skip("../shared/data is not present")
    dev = str(SST2 / "dev.tsv")
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "linear_probe.py"), str(sample_checkpoint), dev, dev,
                           "--label-column", "polarity"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {dev}: no column 'polarity' (columns: label, content; set --label-column)")
