"""A run's curves: drawn at the end of every run beside its metrics.csv and by `bertpre curves`."""

import csv

import pytest
from conftest import ROOT

from bertpre.cli import main
from bertpre.errors import UserError
from bertpre.training.curves import find_metrics, plot_curves, read_series

PNG = b"\x89PNG\r\n\x1a\n"
QUICKSTART = ROOT / "studies" / "quickstart-corpus" / "quickstart-metrics.csv"  # a real run's log


def write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def test_a_real_run_s_log_gives_every_series_with_its_steps():
    series = read_series(QUICKSTART)
    gain = series["val/mlm_context_gain"]
    assert [s for s, _ in gain] == sorted(s for s, _ in gain) and len(gain) >= 10
    assert {"train/loss", "train/lr", "val/mlm_accuracy", "val/mlm_majority_accuracy",
            "val/mlm_random_context_accuracy"} <= set(series)
    assert all(0 <= v <= 1 for _, v in series["val/mlm_accuracy"])


def test_the_picture_is_written_beside_metrics_csv_for_the_newest_version(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "logs" / "version_1" / "metrics.csv", [{"step": 1, "train/loss": 3.0}])
    write_metrics(run / "logs" / "version_10" / "metrics.csv", [{"step": 1, "train/loss": 3.0, "train/lr": 0.1}])
    assert find_metrics(run) == run / "logs" / "version_10" / "metrics.csv"  # 10 after 1, not after 1 as text
    out = plot_curves(run)
    assert out == run / "logs" / "version_10" / "curves.png" and out.read_bytes().startswith(PNG)
    assert not list(out.parent.glob(".*tmp"))


def test_bertpre_curves_draws_a_real_run_where_asked(tmp_path, capsys):
    main(["curves", str(QUICKSTART), "--output", str(tmp_path / "q.png")])
    assert capsys.readouterr().out == f"curves {tmp_path / 'q.png'}\n"
    assert (tmp_path / "q.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "no metrics.csv"),
    (lambda d: write_metrics(d / "metrics.csv", [{"step": 1, "epoch": 0}]) or d, "no loss, accuracy or learning"),
    (lambda d: write_metrics(d / "metrics.csv", [{"step": 1, "train/loss": "abc"}]) or d, "column train/loss holds"),
])
def test_what_cannot_be_drawn_gets_one_line(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        plot_curves(make(tmp_path))


def test_an_output_that_is_not_an_image_name_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="not an image file name"):
        plot_curves(QUICKSTART, tmp_path / "curves.txt")
    assert not list(tmp_path.iterdir())
