"""Transfer study: does a pretrained checkpoint fine-tune better than the same architecture from
random initialisation? SST-2 subsets (low-resource runs show transfer best), several subset
seeds, the same fine-tuning budget for both; accuracy on SST-2's dev set.

    python data_prep/transfer_study.py CKPT --output docs/experiments/transfer-mini

Runs one after another (never beside another job: two jobs on 2 cores distort both); writes
table.md and results.json to --output.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "tasks" / "sst2"


def finetune(checkpoint: Path, seed: int, random_init: bool, args, runs: Path) -> dict:
    run = runs / f"{'random' if random_init else 'pretrained'}-{seed}"
    argv = [sys.executable, "-m", "bertpre.cli", "finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"),
            "--model.pretrained", str(checkpoint), "--model.random_init", str(random_init).lower(),
            "--data.train_file", str(args.train), "--data.validation_file", str(args.dev),
            "--data.max_train_examples", str(args.examples), "--data.subset_seed", str(seed),
            "--trainer.max_epochs", str(args.epochs), "--model.learning_rate", str(args.learning_rate),
            "--trainer.default_root_dir", str(run), "--overwrite", "true", "--trainer.enable_progress_bar", "false",
            "--seed_everything", str(seed)]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"transfer_study: {run.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader((versions[-1] / "metrics.csv").open()))
    accuracies = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    return {"run": run.name, "seed": seed, "random_init": random_init, "final_accuracy": accuracies[-1],
            "best_accuracy": max(accuracies), "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a bertpre pretraining checkpoint")
    p.add_argument("--output", type=Path, required=True, help="folder for table.md and results.json")
    p.add_argument("--train", type=Path, default=SST2 / "train.tsv")
    p.add_argument("--dev", type=Path, default=SST2 / "dev.tsv")
    p.add_argument("--examples", type=int, default=2000, help="training sentences per subset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="subset seeds")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--runs", type=Path, default=Path("runs/transfer-study"))
    args = p.parse_args(argv)
    if not args.checkpoint.is_file():
        sys.exit(f"transfer_study: {args.checkpoint}: not found")
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for random_init in (False, True):
            results.append(finetune(args.checkpoint, seed, random_init, args, args.runs))
            print(json.dumps(results[-1]), flush=True)
            (args.output / "results.json").write_text(json.dumps(
                {"checkpoint": str(args.checkpoint), "options": {k: str(v) for k, v in vars(args).items()},
                 "runs": results}, indent=2) + "\n")
    pretrained = [r["final_accuracy"] for r in results if not r["random_init"]]
    scratch = [r["final_accuracy"] for r in results if r["random_init"]]
    lines = [f"SST-2 dev accuracy after {args.epochs} epochs on {args.examples} training sentences, lr "
             f"{args.learning_rate}, from `{args.checkpoint}` or the same architecture at random initialisation.", "",
             "| subset seed | pretrained | random init | difference |", "|---|---|---|---|"]
    for seed, a, b in zip(args.seeds, pretrained, scratch):
        lines.append(f"| {seed} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    lines.append(f"| mean | {statistics.mean(pretrained):.4f} | {statistics.mean(scratch):.4f} | "
                 f"{statistics.mean(pretrained) - statistics.mean(scratch):+.4f} |")
    (args.output / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
