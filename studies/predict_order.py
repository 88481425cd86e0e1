"""`bertpre predict` at this checkout against a baseline revision, on the same classifier and file.

    python -m studies.predict_order --baseline REV --input TABLE [--rows 5000] [--repeats 3] --output DIR

A bert-mini classifier (configs/bert-mini-cpu.yaml's model, pretrained 2 steps on the bundled
books, fine-tuned 2 steps on the first rows of --input: its weights do not matter for speed) is
built with this checkout's commands; then the two revisions' `bertpre predict --scores` on the
first --rows rows of --input alternate, --repeats times each, every run a separate process timed
from start to exit (start-up and loading the checkpoint included). The baseline runs from a git
worktree of REV. Writes DIR/results.json: the wall times, their medians and ratio, and how the
outputs compare (rows with another prediction, the largest score difference).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bertpre.perf.bench import machine_description

ROOT = Path(__file__).resolve().parents[1]


def bertpre(tree: Path, *args: str) -> float:
    """Run ``bertpre ARGS`` from the source tree ``tree``; its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bertpre.cli", *args], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def classifier(work: Path, table: Path) -> Path:
    """A bert-mini classifier checkpoint built with this checkout's commands."""
    sample = ROOT / "data_prep"
    bertpre(ROOT, "prepare", "--input", str(sample / "sample"), str(sample / "books"), "--output",
            str(work / "books"), "--vocab-size", "8192", "--max-seq-length", "128")
    bertpre(ROOT, "train", "--config", str(ROOT / "configs" / "bert-mini-cpu.yaml"), "--data.path",
            str(work / "books"), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
            "--trainer.precision", "32", "--trainer.default_root_dir", str(work / "pretrained"))
    bertpre(ROOT, "finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained",
            str(work / "pretrained" / "checkpoints" / "last.ckpt"), "--data.train_file", str(table),
            "--data.validation_file", str(table), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
            "--trainer.default_root_dir", str(work / "finetuned"))
    return work / "finetuned" / "checkpoints" / "last.ckpt"


def read(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(), delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="the git revision to compare with")
    p.add_argument("--input", required=True, type=Path, help="a labelled table (e.g. SST-2's train.tsv)")
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="predict-order-") as tmp:
        work = Path(tmp)
        table = work / "rows.tsv"
        table.write_text("".join(args.input.read_text().splitlines(True)[: args.rows + 1]))
        checkpoint = classifier(work, table)
        baseline = work / "baseline"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True)
        try:
            trees = {"baseline": baseline, "current": ROOT}
            seconds: dict[str, list[float]] = {arm: [] for arm in trees}
            for _ in range(args.repeats):
                for arm, tree in trees.items():
                    seconds[arm].append(bertpre(tree, "predict", "--checkpoint", str(checkpoint), "--input", str(table),
                                                "--output", str(work / f"{arm}.tsv"), "--scores", "--overwrite"))
            before, after = read(work / "baseline.tsv"), read(work / "current.tsv")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=True)
    score = next(k for k in before[0] if k.startswith("p_"))
    medians = {arm: statistics.median(s) for arm, s in seconds.items()}
    results = {
        "baseline": args.baseline, "current": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                             capture_output=True, text=True).stdout.strip(),
        "machine": machine_description(torch.device("cpu")), "rows": len(after),
        "seconds": seconds, "median_seconds": medians, "speedup": medians["baseline"] / medians["current"],
        "rows_with_another_prediction": sum(a["prediction"] != b["prediction"] for a, b in zip(before, after)),
        "largest_score_difference": max(abs(float(a[score]) - float(b[score])) for a, b in zip(before, after)),
        "same_rows_in_the_same_order": [list(a.values())[-2:] for a in before] == [list(b.values())[-2:] for b in after],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
