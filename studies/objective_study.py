"""Objective study: NSP (BERT), SOP (ALBERT) and none (RoBERTa's full sequences) under the same
CPU recipe and the same wall-clock budget, then SST-2 transfer from each.

1. ``bertpre prepare`` the corpus three times at --seq-length, one tokenizer for all (sop and none
   reuse nsp's), so the arms differ in the objective only;
2. one ``bertpre train`` per objective with --config (the CPU recipe) for --minutes of training
   (the recipe study's arm runner: schedule over the budget, validation every --val-every steps);
3. ``studies/transfer_study.py`` on each final checkpoint: SST-2 subsets, the same fine-tuning
   budget; random-init runs once (from the nsp checkpoint: the same architecture and tokenizer).

    python -m studies.objective_study --corpus data_prep/sample data_prep/books --minutes 10 \\
        --output studies/objectives

Writes table.md, curves.png and results.json to --output. Runs one after another: never beside
another job (two jobs on 2 cores distort both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from studies import recipe_study, transfer_study

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("nsp", "sop", "none")


def prepare(corpus: list[str], out: Path, objective: str, seq: int, vocab: int, tokenizer: Path | None) -> Path:
    folder = out / f"{objective}-{seq}"
    argv = [sys.executable, "-m", "bertpre.cli", "prepare", "--input", *corpus, "--output", str(folder),
            "--objective", objective, "--max-seq-length", str(seq), "--vocab-size", str(vocab), "--overwrite",
            *(["--tokenizer", str(tokenizer)] if tokenizer else [])]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"objective_study: prepare {objective} failed: {done.stderr.strip().splitlines()[-1:]}")
    return folder


def final_metrics(run: Path) -> dict:
    """The last validation's figures of a run (sentence accuracy under its objective's name)."""
    import csv

    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = [r for r in csv.DictReader((versions[-1] / "metrics.csv").open()) if r.get("val/mlm_accuracy")]
    last = rows[-1]
    sentence = next((float(v) for k, v in last.items() if k in ("val/nsp_accuracy", "val/sop_accuracy") and v), None)
    return {"val_mlm_accuracy": float(last["val/mlm_accuracy"]), "majority": float(last["val/mlm_majority_accuracy"]),
            "context_gain": float(last["val/mlm_context_gain"]), "sentence_accuracy": sentence}


def table(results: list[dict]) -> str:
    lines = ["| objective | steps | tokens seen (M) | val MLM accuracy (majority) | context gain | sentence accuracy "
             "| SST-2 2k, pretrained (3 seeds) | random init |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        sentence = f"{r['sentence_accuracy']:.3f}" if r["sentence_accuracy"] is not None else "-"
        transfer = r.get("transfer", {})
        lines.append(f"| {r['arm']} | {r['steps']} | {r['steps'] * r['batch_size'] * r['max_seq_length'] / 1e6:.1f} | "
                     f"{r['val_mlm_accuracy']:.3f} ({r['majority']:.3f}) | {r['context_gain']:.3f} | {sentence} | "
                     f"{transfer.get('pretrained', '-')} | {transfer.get('random', '-')} |")
    return "\n".join(lines) + "\n"


def transfer(checkpoint: Path, output: Path, runs: Path, random_from: Path | None) -> dict:
    argv = [str(checkpoint), "--output", str(output), "--runs", str(runs), "--learning-rates", "3e-4"]
    transfer_study.main(argv + (["--random-from", str(random_from)] if random_from else []))
    runs_done = json.loads((output / "results.json").read_text())["runs"]

    def summary(random_init: bool) -> str:
        values = [r["final_accuracy"] for r in runs_done if r["random_init"] == random_init]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} +- {spread:.3f} ({', '.join(f'{v:.3f}' for v in values)})"

    return {"pretrained": summary(False), "random": summary(True)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", nargs="+", required=True, help="the text to pretrain on (bertpre prepare --input)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "bert-mini-cpu.yaml")
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--minutes", type=float, default=10.0, help="training time per objective")
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--no-transfer", action="store_true", help="pretraining only")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("runs/objective-study"), help="prepared data and run folders")
    args = p.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    results = []
    for objective in args.objectives:
        data = prepare(args.corpus, args.work / "data", objective, args.seq_length, args.vocab_size, tokenizer)
        tokenizer = tokenizer or data
        recipe_study.ARMS[objective] = (f"--objective {objective}", [])
        result = recipe_study.run_arm(objective, args.config, data, args.minutes, None, args.val_every,
                                      args.val_batches, args.work / "runs")
        result.update(final_metrics(Path(result["run"])))
        results.append(result)
        (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    recipe_study.plot(results, args.output / "curves.png")
    (args.output / "table.md").write_text(table(results))
    if not args.no_transfer:
        random_from = None
        for result in results:
            where = args.output / f"transfer-{result['arm']}"
            result["transfer"] = transfer(Path(result["run"]) / "checkpoints" / "last.ckpt", where,
                                          args.work / "transfer" / result["arm"], random_from)
            random_from = random_from or where / "results.json"
            (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            (args.output / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
