"""The training console: a step bar, a validation line, one model line, no Lightning noise."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

TINY = str(ROOT / "configs" / "bert-tiny.yaml")


@pytest.mark.slow  # a fresh process (Lightning prints some notices once a process), 14 s here; in CI's slow run
def test_a_step_based_run_shows_steps_and_nothing_of_lightnings_noise(sample_prepared, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "bertpre.cli", "train", "--config", TINY, "--data.path", str(sample_prepared),
         "--trainer.default_root_dir", str(run), "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
         "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "6/6" in output  # the bar counts optimizer steps up to max_steps
    assert "Epoch" not in output and "/-2" not in output and "-2 " not in output
    assert "Total FLOPs" not in output and "ModuleDict" not in output  # no module table
    assert "Tip:" not in output and "litlogger" not in output and "litmodels" not in output
    assert "model  2 layers, hidden 128, 2 heads, post-LN" in done.stdout
    assert "batch  64 per device = 64 sequences per optimizer step; 6 steps" in done.stdout
    lines = output.replace("\r", "\n").splitlines()
    for step in (3, 6):  # one line per validation, with its metrics
        assert any(line.startswith(f"step {step}: ") and "val/mlm_accuracy" in line for line in lines), step
    # the summary names only what exists
    named = [word for word in done.stdout.split() if word.startswith(str(run))]
    assert named and all(Path(word).exists() for word in named), named


@pytest.mark.slow  # six seconds of real training in a subprocess: the slow run
def test_a_time_budget_run_shows_its_clock_against_the_budget(sample_prepared, tmp_path):
    """A run bounded by trainer.max_time has no step total: the bar shows elapsed / budget instead."""
    done = subprocess.run(
        [sys.executable, "-m", "bertpre.cli", "train", "--config", TINY, "--data.path", str(sample_prepared),
         "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "-1",
         "--trainer.max_time", "00:00:00:06", "--trainer.limit_val_batches", "0", "--data.batch_size", "8"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = re.findall(r"time (\d+):(\d\d)/0:06", done.stderr)
    assert shown, done.stderr[-2000:]
    assert all(int(m) * 60 + int(s) <= 6 for m, s in shown)
