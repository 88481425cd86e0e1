"""Recipe study: learning curves of pretraining recipes under the same wall-clock budget.

Each arm is one `bertpre train` run of a config (bert-tiny by default) with its overrides,
given --minutes of training time (model.schedule_by time, so every arm warms up and decays
within its budget). From each run's metrics.csv it reads validation MLM accuracy and the
context gain (val/mlm_context_gain) against steps and tokens, and from its TensorBoard log the
wall-clock minute of each validation (validation time included, as the budget counts it). It
writes a table (table.md), the curves (curves.png) and the raw figures (results.json) to --output.

    python studies/recipe_study.py --data out/gutenberg --minutes 8 --output studies/recipe-study

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

import yaml

from bertpre.data.prepared import PreparedData

ROOT = Path(__file__).resolve().parents[1]

# Google's recipe as in the BERT paper and bertpre's configs before the study: post-LN, dropout 0.1,
# BERT's initialisation, 15% masking, Adam betas (0.9, 0.999), linear decay, batch 64
GOOGLE = ["--model.config.norm_placement", "post", "--model.config.hidden_dropout", "0.1",
          "--model.config.attention_dropout", "0.1", "--model.config.position_init", "normal",
          "--model.config.initializer_range", "0.02", "--model.lr_schedule", "linear",
          "--model.adam_betas", "[0.9, 0.999]", "--model.warmup_fraction", "0.04",
          "--data.mlm_probability", "0.15", "--model.learning_rate", "5e-4", "--data.batch_size", "64"]

# name -> (what it is, overrides on top of --config); every arm: the schedule spans the time budget
ARMS = {
    "google": ("Google's: post-LN, lr 5e-4, warmup 4%, linear decay, dropout 0.1, mask 15%, batch 64", GOOGLE),
    "recommended": ("the config as shipped (see its comments)", []),
    "pre-ln": ("pre-LN, lr 2e-3, no dropout, warmup 5%, linear decay",
               ["--model.config.norm_placement", "pre", "--model.learning_rate", "2e-3",
                "--model.config.hidden_dropout", "0", "--model.config.attention_dropout", "0"]),
    "recommended-mask15": ("the config as shipped with 15% masking", ["--data.mlm_probability", "0.15"]),
    "learned-positions": ("the config as shipped with BERT's learned positions from N(0, 0.02)",
                          ["--model.config.position_init", "normal"]),
    "sinusoidal-positions": ("the config as shipped with sin/cos initial positions",
                             ["--model.config.position_init", "sinusoidal"]),
}


def run_arm(name: str, config: Path, data: Path, minutes: float, batch_size: int | None, val_every: int,
            val_batches: int, runs: Path) -> dict:
    seconds = max(1, round(minutes * 60))
    budget = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    run = runs / name
    argv = [sys.executable, "-m", "bertpre.cli", "train", "--config", str(config), "--data.path", str(data),
            "--trainer.default_root_dir", str(run), "--overwrite", "true", "--trainer.max_steps", "-1",
            "--trainer.max_time", budget, "--model.schedule_by", "time",
            "--trainer.val_check_interval", str(val_every), "--trainer.limit_val_batches", str(val_batches),
            "--model.plateau_min_gain", "0", "--trainer.enable_progress_bar", "false", *ARMS[name][1],
            *(["--data.batch_size", str(batch_size)] if batch_size else [])]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"recipe_study: arm {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader((versions[-1] / "metrics.csv").open()))
    seq = PreparedData(data).max_seq_length
    resolved = yaml.safe_load((versions[-1] / "config.yaml").read_text())
    batch_size = resolved["data"]["batch_size"]
    curve = [{"step": int(r["step"]) + 1, "mlm_accuracy": float(r["val/mlm_accuracy"]),
              "context_gain": float(r["val/mlm_context_gain"]),
              "majority": float(r["val/mlm_majority_accuracy"])}
             for r in rows if r.get("val/mlm_accuracy") and r.get("val/mlm_context_gain")]
    steps = max((int(r["step"]) + 1 for r in rows if r.get("step")), default=0)
    clock = validation_minutes(versions[-1])
    for point in curve:
        point["tokens"] = point["step"] * batch_size * seq  # sequence slots, padding included
        # the wall clock of the validation's log entry; without one, steps at an even pace over the budget
        point["minutes"] = clock.get(point["step"], minutes * point["step"] / max(steps, 1))
    return {"arm": name, "what": ARMS[name][0], "data": str(data), "run": str(run), "max_seq_length": seq,
            "steps": steps, "batch_size": batch_size,
            "precision": done.stdout.split("precision ", 1)[1].split()[0] if "precision " in done.stdout else
            str(resolved["trainer"].get("precision")), "wall_seconds": round(wall, 1), "curve": curve}


def validation_minutes(log_dir: Path) -> dict[int, float]:
    """Step -> minutes from the start of the run to the end of that step's validation, read from the
    wall-clock times of the run's TensorBoard events (the log opens when training starts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(log_dir.glob("events.out.tfevents.*"))
    if not files:
        return {}
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    if "val/mlm_accuracy" not in events.Tags()["scalars"]:
        return {}
    start = events.FirstEventTimestamp()
    return {e.step + 1: (e.wall_time - start) / 60 for e in events.Scalars("val/mlm_accuracy")}


def reached(curve: list[dict], accuracy: float) -> str:
    point = next((p for p in curve if p["mlm_accuracy"] >= accuracy), None)
    return f"{point['tokens'] / 1e6:.1f}M / {point['minutes']:.1f} min" if point else "not reached"


def google_final(results: list[dict], data: str | None) -> float | None:
    """The final val MLM accuracy of Google's arm trained on ``data``, the mark each arm on that data is timed to."""
    google = next((r for r in results if r["arm"] == "google" and r["curve"] and r.get("data") == data), None)
    return google["curve"][-1]["mlm_accuracy"] if google else None


def arm_label(r: dict, results: list[dict]) -> str:
    """The arm's name, with its sequence length when the study holds arms on several prepared folders."""
    several = len({x.get("data") for x in results}) > 1
    return f"{r['arm']} (seq {r.get('max_seq_length', '?')})" if several else r["arm"]


def table(results: list[dict]) -> str:
    lines = ["| arm | recipe | data | steps x batch | final val MLM acc | final context gain | best gain | to 0.25 "
             "| to 0.30 | to google's final on the same data |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = r["curve"][-1] if r["curve"] else {"mlm_accuracy": float("nan"), "context_gain": float("nan")}
        best = max((p["context_gain"] for p in r["curve"]), default=float("nan"))
        target = google_final(results, r.get("data"))
        lines.append(f"| {r['arm']} | {r['what']} | {r.get('data', '?')} (seq {r.get('max_seq_length', '?')}) | "
                     f"{r['steps']} x {r.get('batch_size', '?')} | "
                     f"{last['mlm_accuracy']:.4f} | {last['context_gain']:.4f} | {best:.4f} | "
                     f"{reached(r['curve'], 0.25)} | {reached(r['curve'], 0.30)} | "
                     f"{f'{target:.4f}: ' + reached(r['curve'], target) if target else '-'} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Accuracy and context gain against tokens (top) and against wall-clock minutes (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for row, (x, label) in enumerate((("tokens", "tokens (M sequence slots)"), ("minutes", "wall-clock minutes"))):
        accuracy, gain = axes[row]
        for r in results:
            xs = [p[x] / (1e6 if x == "tokens" else 1) for p in r["curve"]]
            accuracy.plot(xs, [p["mlm_accuracy"] for p in r["curve"]], marker=".", label=arm_label(r, results))
            gain.plot(xs, [p["context_gain"] for p in r["curve"]], marker=".", label=arm_label(r, results))
        if results and results[0]["curve"]:
            accuracy.axhline(results[0]["curve"][-1]["majority"], color="grey", linestyle=":",
                             label="most frequent token")
        label_panels(accuracy, gain, label)
    save_figure(fig, path)


def label_panels(accuracy, gain, xlabel: str, accuracy_title: str = "validation MLM accuracy") -> None:
    """The titles, axis labels and legend of an accuracy panel and a context-gain panel."""
    accuracy.set(title=accuracy_title, xlabel=xlabel, ylabel="accuracy")
    gain.set(title="context gain (real minus random context)", xlabel=xlabel, ylabel="gain")
    accuracy.legend()


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a folder written by `bertpre prepare`")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "bert-tiny.yaml")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--minutes", type=float, default=8.0, help="training time per arm")
    p.add_argument("--batch-size", type=int, default=None, help="override every arm's batch size")
    p.add_argument("--val-every", type=int, default=100, help="steps between validations")
    p.add_argument("--val-batches", type=int, default=10)
    p.add_argument("--output", type=Path, required=True, help="folder for table.md, curves.png, results.json")
    p.add_argument("--runs", type=Path, default=Path("runs/recipe-study"), help="run folders (checkpoints, logs)")
    p.add_argument("--append", action="store_true",
                   help="keep the other arms already in --output/results.json (an arm run again on the same "
                        "--data replaces its entry; on other data it is added)")
    args = p.parse_args(argv)
    if not (args.data / "prepare.json").is_file():
        sys.exit(f"recipe_study: --data {args.data}: not a folder written by `bertpre prepare`")
    if args.minutes <= 0:
        sys.exit(f"recipe_study: --minutes must be positive, got {args.minutes}")
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    if args.append and (args.output / "results.json").is_file():
        results = [r for r in json.loads((args.output / "results.json").read_text())
                   if not (r["arm"] in args.arms and r.get("data") == str(args.data))]
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
