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


def finetune(checkpoint: Path, seed: int, random_init: bool, learning_rate: float, args, runs: Path) -> dict:
    run = runs / f"{'random' if random_init else 'pretrained'}-lr{learning_rate:g}-{seed}"
    argv = [sys.executable, "-m", "bertpre.cli", "finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"),
            "--model.pretrained", str(checkpoint), "--model.random_init", str(random_init).lower(),
            "--data.train_file", str(args.train), "--data.validation_file", str(args.dev),
            "--data.max_train_examples", str(args.examples), "--data.subset_seed", str(seed),
            "--trainer.max_epochs", str(args.epochs), "--model.learning_rate", str(learning_rate),
            "--trainer.default_root_dir", str(run), "--overwrite", "true", "--trainer.enable_progress_bar", "false",
            "--seed_everything", str(seed)]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"transfer_study: {run.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader((versions[-1] / "metrics.csv").open()))
    accuracies = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    return {"run": run.name, "seed": seed, "random_init": random_init, "learning_rate": learning_rate,
            "final_accuracy": accuracies[-1], "best_accuracy": max(accuracies),
            "seconds": round(time.perf_counter() - started, 1)}


def table(results: list[dict], args) -> str:
    lines = [f"SST-2 dev accuracy (872 sentences; one standard error is about 1.5 points near 0.70) after "
             f"{args.epochs} epochs on {args.examples} training sentences, from `{args.checkpoint}` or the same "
             "architecture at random initialisation; final epoch (best epoch in brackets).", "",
             "| lr | subset seed | pretrained | random init | difference |", "|---|---|---|---|---|"]
    for lr in sorted({r["learning_rate"] for r in results}):
        pairs = []
        for seed in args.seeds:
            got = {r["random_init"]: r for r in results if r["learning_rate"] == lr and r["seed"] == seed}
            if len(got) == 2:
                a, b = got[False], got[True]
                pairs.append((a, b))
                lines.append(f"| {lr:g} | {seed} | {a['final_accuracy']:.4f} ({a['best_accuracy']:.4f}) | "
                             f"{b['final_accuracy']:.4f} ({b['best_accuracy']:.4f}) | "
                             f"{a['final_accuracy'] - b['final_accuracy']:+.4f} |")
        if pairs:
            a = statistics.mean(p[0]["final_accuracy"] for p in pairs)
            b = statistics.mean(p[1]["final_accuracy"] for p in pairs)
            lines.append(f"| {lr:g} | mean of {len(pairs)} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a bertpre pretraining checkpoint")
    p.add_argument("--output", type=Path, required=True, help="folder for table.md and results.json")
    p.add_argument("--train", type=Path, default=SST2 / "train.tsv")
    p.add_argument("--dev", type=Path, default=SST2 / "dev.tsv")
    p.add_argument("--examples", type=int, default=2000, help="training sentences per subset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="subset seeds")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--learning-rates", type=float, nargs="+", default=[1e-4],
                   help="fine-tuning learning rates; every one runs every seed, pretrained and from random init")
    p.add_argument("--runs", type=Path, default=Path("runs/transfer-study"))
    args = p.parse_args(argv)
    if not args.checkpoint.is_file():
        sys.exit(f"transfer_study: {args.checkpoint}: not found")
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    for learning_rate in args.learning_rates:
        for seed in args.seeds:
            for random_init in (False, True):
                results.append(finetune(args.checkpoint, seed, random_init, learning_rate, args, args.runs))
                print(json.dumps(results[-1]), flush=True)
                (args.output / "results.json").write_text(json.dumps(
                    {"checkpoint": str(args.checkpoint), "options": {k: str(v) for k, v in vars(args).items()},
                     "runs": results}, indent=2) + "\n")
                (args.output / "table.md").write_text(table(results, args))
    print(table(results, args))


if __name__ == "__main__":
    main()
