"""Transfer study: does a pretrained checkpoint fine-tune better than the same architecture from
random initialisation? Subsets of a task's training file (SST-2 by default; low-resource runs show
transfer best), several subset seeds, the same fine-tuning budget for both; accuracy on its dev set.

    python studies/transfer_study.py CKPT --output studies/transfer-mini

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

from bertpre.errors import UserError
from bertpre.model.bert import DROPOUT_FIELDS, POOLINGS, check_dropout, config_differences
from bertpre.tasks.table import read_table

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
            "--seed_everything", str(seed), "--model.pooling", args.pooling,
            "--model.hidden_dropout", args.dropout, "--model.attention_dropout", args.dropout,
            *(["--model.layer_lr_decay", str(args.layer_lr_decay)] if not random_init else []),
            *(["--model.reinit_pooler", "true"] if args.reinit_pooler and not random_init else []),
            *(["--model.reinit_layers", str(args.reinit_layers)] if args.reinit_layers and not random_init else [])]
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
    n_dev = len(read_table(args.dev))
    lines = [f"Dev accuracy on `{args.dev}` ({n_dev} examples; one standard error is about "
             f"{100 * (0.25 / n_dev) ** 0.5:.1f} points near 0.5, less nearer 1) after "
             f"{args.epochs} epochs on {args.examples} training examples, from `{args.checkpoint}`"
             f"{' (pooler re-initialised)' if args.reinit_pooler else ''}"
             f"{f' (top {args.reinit_layers} layers re-initialised)' if args.reinit_layers else ''}"
             f"{f' (layer-wise lr decay {args.layer_lr_decay:g})' if args.layer_lr_decay != 1 else ''}"
             f"{', classifying the mean of the last hidden states' if args.pooling == 'mean' else ''}"
             f"{', the pretraining dropout' if args.dropout == 'null' else f', dropout {args.dropout}'} or the same "
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
    p.add_argument("--random-from", type=Path, default=None, metavar="RESULTS_JSON",
                   help="take the random-init runs from an earlier study's results.json (same subsets, epochs and "
                        "architecture) instead of running them again")
    p.add_argument("--reinit-pooler", action="store_true",
                   help="the pretrained runs start their pooler from random weights (model.reinit_pooler)")
    p.add_argument("--reinit-layers", type=int, default=0, metavar="N",
                   help="the pretrained runs start their top N encoder layers from random weights (model.reinit_layers)")
    p.add_argument("--layer-lr-decay", type=float, default=1.0, metavar="FACTOR",
                   help="layer-wise learning-rate decay in the pretrained runs (model.layer_lr_decay; 1: none); the "
                        "random-init runs train every layer at one rate: there are no pretrained layers to keep")
    p.add_argument("--pooling", choices=POOLINGS, default="cls",
                   help="what the classifier reads, in every run of the study (model.pooling)")
    p.add_argument("--dropout", type=dropout_rate, default="0.1",
                   help="the encoder's dropout while fine-tuning, in every run (model.hidden_dropout and "
                        "model.attention_dropout): a rate, or 'encoder' for the rate it was pretrained with "
                        "(what studies before this option ran)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --output's results.json (same checkpoint and options) and run "
                        "only the missing ones")
    args = p.parse_args(argv)
    if not args.checkpoint.is_file():
        sys.exit(f"transfer_study: {args.checkpoint}: not found")
    options = {k: str(v) for k, v in vars(args).items()}
    pretrained_side = ("checkpoint", "reinit_pooler", "reinit_layers", "layer_lr_decay")
    kept = previous_runs(args.output / "results.json", options, pretrained_side) if args.resume else []
    borrowed = ([r for r in previous_runs(args.random_from, options, ()) if r["random_init"]]
                if args.random_from else [])
    if borrowed:
        same_start(args.checkpoint, Path(json.loads(args.random_from.read_text())["checkpoint"]),
                   fixed_dropout=args.dropout != "null")
    args.output.mkdir(parents=True, exist_ok=True)
    results = list(kept)
    for learning_rate, seed, random_init in planned(args, kept):
        source = next((r for r in borrowed if (r["learning_rate"], r["seed"]) == (learning_rate, seed)), None)
        if random_init and source is not None:
            results.append({**source, "from": str(args.random_from)})
        else:
            results.append(finetune(args.checkpoint, seed, random_init, learning_rate, args, args.runs))
        print(json.dumps(results[-1]), flush=True)
        (args.output / "results.json").write_text(json.dumps(
            {"checkpoint": str(args.checkpoint), "options": options, "runs": results}, indent=2) + "\n")
        (args.output / "table.md").write_text(table(results, args))
    print(table(results, args))


# options that must agree for two studies' runs to be compared, and the value of those a study
# written before the option existed ran with
SAME_STUDY = ("train", "dev", "examples", "epochs", "pooling", "dropout")
BEFORE_THE_OPTION = {"reinit_pooler": "False", "reinit_layers": "0", "pooling": "cls", "dropout": "null",
                     "layer_lr_decay": "1.0"}


def dropout_rate(value: str) -> str:
    """--dropout as the fine-tuning command takes it: a rate in [0, 1), or 'encoder' (null)."""
    if value == "encoder":
        return "null"
    try:
        check_dropout("--dropout", float(value))
    except (ValueError, UserError):
        raise argparse.ArgumentTypeError(f"a rate in [0, 1) or 'encoder', got {value!r}") from None
    return str(float(value))


def previous_runs(path: Path, options: dict, also: tuple[str, ...]) -> list[dict]:
    """The runs recorded in an earlier study's results.json, refused when its options differ from ours."""
    if not path.is_file():
        if also:  # --resume with nothing to resume: start afresh
            return []
        sys.exit(f"transfer_study: {path}: not found")
    earlier = json.loads(path.read_text())
    for key in SAME_STUDY + also:
        theirs = earlier["options"].get(key, BEFORE_THE_OPTION.get(key))
        if theirs != options[key]:
            sys.exit(f"transfer_study: {path} was run with {key} {theirs}, "
                     f"this study with {options[key]}; its runs cannot be reused")
    return earlier["runs"]


def same_start(ours: Path, theirs: Path, fixed_dropout: bool) -> None:
    """Refuse to borrow random-init runs made from a checkpoint of another architecture or tokenizer:
    a random-init run keeps both from the checkpoint it was given. With a fixed fine-tuning dropout
    (``--dropout RATE``, the same in both studies), the rates the checkpoints were pretrained with do
    not reach the runs."""
    from bertpre.errors import UserError
    from bertpre.model.checkpoint import CHECKPOINT_KEY, read_checkpoint

    try:
        a, b = (read_checkpoint(path)[CHECKPOINT_KEY] for path in (ours, theirs))
    except UserError as e:
        sys.exit(f"transfer_study: --random-from: {e}")
    # a random-init run drops the pretraining heads and makes its pooler anew: whether the checkpoint had a
    # sentence head (--objective none) does not reach it
    ignored = (*(DROPOUT_FIELDS if fixed_dropout else ()), "sentence_head")
    for key, differs in (("model config", config_differences(a["model_config"], b["model_config"], ignored)),
                         ("tokenizer", a["tokenizer"] != b["tokenizer"])):
        if differs:
            sys.exit(f"transfer_study: --random-from: {theirs} has another {key} than {ours}; "
                     "its random-init runs are not this checkpoint's")


def planned(args, kept: list[dict]) -> list[tuple[float, int, bool]]:
    """(learning rate, subset seed, random init) of every run this study needs and ``kept`` lacks, in order."""
    done = {(r["learning_rate"], r["seed"], r["random_init"]) for r in kept}
    return [(lr, seed, random_init) for lr in args.learning_rates for seed in args.seeds
            for random_init in (False, True) if (lr, seed, random_init) not in done]


if __name__ == "__main__":
    main()
