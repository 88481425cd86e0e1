"""Recipe study: learning curves of pretraining recipes under the same wall-clock budget.

Each arm is one `bertpre train` run of a config (bert-tiny by default) with its overrides,
given --minutes of training time (model.schedule_by time, so every arm warms up and decays
within its budget). From each run's metrics.csv it reads validation MLM accuracy and the
context gain (val/mlm_context_gain) against steps and tokens, and writes a table
(table.md), the curves (curves.png) and the raw figures (results.json) to --output.

    python data_prep/recipe_study.py --data out/gutenberg --minutes 8 --output docs/experiments/recipe-study

Arms run one after another: never beside another job (two jobs on 2 cores distort both).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (what it is, overrides on top of the config); every arm: schedule over the time budget
ARMS = {
    "google": ("the config as shipped: post-LN, lr 1e-3, warmup 5%, linear decay, dropout 0.1, mask 15%", []),
    "pre-ln": ("pre-LN, lr 2e-3, no dropout, warmup 5%, linear decay",
               ["--model.config.norm_placement", "pre", "--model.learning_rate", "2e-3",
                "--model.config.hidden_dropout", "0", "--model.config.attention_dropout", "0"]),
    "pre-ln-wsd-mask30": ("pre-LN, lr 2e-3, no dropout, warmup-stable-decay, 30% masking",
                          ["--model.config.norm_placement", "pre", "--model.learning_rate", "2e-3",
                           "--model.config.hidden_dropout", "0", "--model.config.attention_dropout", "0",
                           "--model.lr_schedule", "wsd", "--data.mlm_probability", "0.3"]),
}


def run_arm(name: str, config: Path, data: Path, minutes: float, batch_size: int, val_every: int,
            val_batches: int, runs: Path) -> dict:
    seconds = max(1, round(minutes * 60))
    budget = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    run = runs / name
    argv = [sys.executable, "-m", "bertpre.cli", "train", "--config", str(config), "--data.path", str(data),
            "--trainer.default_root_dir", str(run), "--overwrite", "true", "--trainer.max_steps", "-1",
            "--trainer.max_time", budget, "--model.schedule_by", "time", "--data.batch_size", str(batch_size),
            "--trainer.val_check_interval", str(val_every), "--trainer.limit_val_batches", str(val_batches),
            "--model.plateau_min_gain", "0", "--trainer.enable_progress_bar", "false", *ARMS[name][1]]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"recipe_study: arm {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader((versions[-1] / "metrics.csv").open()))
    seq = json.loads((data / "prepare.json").read_text())["max_seq_length"]
    curve = [{"step": int(r["step"]) + 1, "mlm_accuracy": float(r["val/mlm_accuracy"]),
              "context_gain": float(r["val/mlm_context_gain"]),
              "majority": float(r["val/mlm_majority_accuracy"])}
             for r in rows if r.get("val/mlm_accuracy") and r.get("val/mlm_context_gain")]
    steps = max((int(r["step"]) + 1 for r in rows if r.get("step")), default=0)
    for point in curve:
        point["tokens"] = point["step"] * batch_size * seq  # sequence slots, padding included
        point["minutes"] = minutes * point["step"] / max(steps, 1)  # steps run at an even pace over the budget
    return {"arm": name, "what": ARMS[name][0], "steps": steps, "wall_seconds": round(wall, 1), "curve": curve}


def reached(curve: list[dict], accuracy: float) -> str:
    point = next((p for p in curve if p["mlm_accuracy"] >= accuracy), None)
    return f"{point['tokens'] / 1e6:.1f}M / {point['minutes']:.1f} min" if point else "not reached"


def table(results: list[dict]) -> str:
    lines = ["| arm | recipe | steps | final val MLM acc | final context gain | best gain | to 0.25 | to 0.30 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = r["curve"][-1] if r["curve"] else {"mlm_accuracy": float("nan"), "context_gain": float("nan")}
        best = max((p["context_gain"] for p in r["curve"]), default=float("nan"))
        lines.append(f"| {r['arm']} | {r['what']} | {r['steps']} | {last['mlm_accuracy']:.4f} | "
                     f"{last['context_gain']:.4f} | {best:.4f} | {reached(r['curve'], 0.25)} | "
                     f"{reached(r['curve'], 0.30)} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy, gain) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in results:
        tokens = [p["tokens"] / 1e6 for p in r["curve"]]
        accuracy.plot(tokens, [p["mlm_accuracy"] for p in r["curve"]], marker=".", label=r["arm"])
        gain.plot(tokens, [p["context_gain"] for p in r["curve"]], marker=".", label=r["arm"])
    if results and results[0]["curve"]:
        accuracy.axhline(results[0]["curve"][-1]["majority"], color="grey", linestyle=":",
                         label="most frequent token")
    accuracy.set(title="validation MLM accuracy", xlabel="tokens (M sequence slots)", ylabel="accuracy")
    gain.set(title="context gain (real minus random context)", xlabel="tokens (M sequence slots)", ylabel="gain")
    accuracy.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a folder written by `bertpre prepare`")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "bert-tiny.yaml")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--minutes", type=float, default=8.0, help="training time per arm")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-every", type=int, default=100, help="steps between validations")
    p.add_argument("--val-batches", type=int, default=10)
    p.add_argument("--output", type=Path, required=True, help="folder for table.md, curves.png, results.json")
    p.add_argument("--runs", type=Path, default=Path("runs/recipe-study"), help="run folders (checkpoints, logs)")
    args = p.parse_args(argv)
    if not (args.data / "prepare.json").is_file():
        sys.exit(f"recipe_study: --data {args.data}: not a folder written by `bertpre prepare`")
    if args.minutes <= 0:
        sys.exit(f"recipe_study: --minutes must be positive, got {args.minutes}")
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.arms:
        results.append(run_arm(name, args.config, args.data, args.minutes, args.batch_size, args.val_every,
                               args.val_batches, args.runs))
        print(table(results[-1:]).splitlines()[-1], flush=True)
        (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "table.md").write_text(table(results))
    plot(results, args.output / "curves.png")
    print(f"wrote {args.output / 'table.md'}, {args.output / 'curves.png'}, {args.output / 'results.json'}")


if __name__ == "__main__":
    main()
