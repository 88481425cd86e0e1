"""The recipe study script runs its arms and writes its table, curves and figures."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_recipe_study_runs_an_arm_end_to_end(sample_prepared, tmp_path):
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, str(ROOT / "data_prep" / "recipe_study.py"), "--data", str(sample_prepared),
                           "--arms", "pre-ln", "--minutes", "0.15", "--batch-size", "8", "--val-every", "10",
                           "--val-batches", "2", "--output", str(out), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results] == ["pre-ln"] and results[0]["steps"] > 10
    curve = results[0]["curve"]
    assert curve and all(-1 <= p["context_gain"] <= 1 and 0 <= p["mlm_accuracy"] <= 1 for p in curve)
    assert (out / "table.md").read_text().count("\n") == 3 and (out / "curves.png").stat().st_size > 10_000
