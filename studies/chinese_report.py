"""The Chinese study's figures from what its runs wrote: both pretraining arms' validation curves
(val MLM accuracy and context gain against steps, one PNG) and one table of the arms and of
ChnSentiCorp fine-tuning from each encoder against random weights.

    python -m studies.chinese_report --study studies/chinese-wwm

Reads STUDY/ARM-metrics.csv (a run's metrics.csv, copied in) for each arm and
STUDY/transfer/NAME/results.json (written by studies/transfer_study.py); writes STUDY/curves.png
and STUDY/table.md. Reads and draws only: nothing is trained here.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bertpre.training.curves import read_series
from studies.recipe_study import label_panels, save_figure

ARMS = {"wwm": "whole words", "char": "characters", "ngram": "whole words in n-grams of up to 4"}
# the encoders fine-tuned: the run folder under runs/zh-study a checkpoint came from, and what it is
ENCODERS = {"wwm": "novels, whole words", "char": "novels, characters",
            "wwm-tapt": "novels, whole words, then the reviews' text",
            "char-tapt": "novels, characters, then the reviews' text",
            "char-tapt5k": "novels, characters, then the reviews' text for 5,000 steps",
            "char-tapt128": "novels, characters, then the reviews' text at pairs of 128",
            "ngram": "novels, n-grams of whole words",
            "ngram-tapt": "novels, n-grams of whole words, then the reviews' text"}


def validation_curve(metrics: Path) -> list[dict]:
    """(step, accuracy, context gain, majority, sentence accuracy) at each validation of a run."""
    series = {name: dict(points) for name, points in read_series(metrics).items()}
    accuracy = series["val/mlm_accuracy"]
    return [{"step": step + 1, "accuracy": value, "gain": series["val/mlm_context_gain"][step],
             "majority": series["val/mlm_majority_accuracy"][step], "nsp": series.get("val/nsp_accuracy", {}).get(step)}
            for step, value in accuracy.items()]


def accuracies(runs: list[dict], random_init: bool) -> list[float]:
    """Final dev accuracies of a transfer study's runs (its results.json "runs"), by seed."""
    return [r["final_accuracy"] for r in sorted(runs, key=lambda r: r["seed"]) if r["random_init"] is random_init]


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def encoder_of(checkpoint: str) -> str:
    """What a checkpoint path (runs/zh-study/NAME/checkpoints/...) was pretrained on."""
    name = Path(checkpoint).parts[-3]
    return ENCODERS.get(name, name)


def transfer_groups(study: Path) -> dict[tuple, list[dict]]:
    """The transfer studies under STUDY/transfer, grouped by fine-tuning settings (labelled reviews,
    epochs, pooling, learning rate): each group compares to its own random-weight runs. Largest
    subsets first."""
    groups: dict[tuple, list[dict]] = {}
    for results in sorted((study / "transfer").glob("*/results.json")):
        study_results = json.loads(results.read_text())
        options = study_results["options"]
        for rate in sorted({r["learning_rate"] for r in study_results["runs"]}, reverse=True):
            runs = [r for r in study_results["runs"] if r["learning_rate"] == rate]
            key = (int(options["examples"]), int(options["epochs"]), options.get("pooling", "cls"), rate)
            groups.setdefault(key, []).append({"folder": results.parent.name,
                                               "encoder": encoder_of(options["checkpoint"]),
                                               "reinit_pooler": options.get("reinit_pooler") == "True",
                                               "random": accuracies(runs, True),
                                               "pretrained": accuracies(runs, False)})
    order = list(ENCODERS.values())
    for studies in groups.values():
        studies.sort(key=lambda s: (order.index(s["encoder"]) if s["encoder"] in order else len(order),
                                    s["reinit_pooler"]))
    return dict(sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2], -kv[0][3])))


def seeds(values: list[float]) -> str:
    return " / ".join(f"{a:.3f}" for a in values)


def table(study: Path, curves: dict[str, list[dict]]) -> str:
    lines = ["| masking | val MLM accuracy at 2k / 4k / 6k / 8k steps | context gain at the end | majority | "
             "NSP accuracy |", "|---|---|---|---|---|"]
    for arm, curve in curves.items():
        at = {p["step"]: p for p in curve}
        marks = " / ".join(f"{at[s]['accuracy']:.3f}" if s in at else "-" for s in (2000, 4000, 6000, 8000))
        end = curve[-1]
        lines.append(f"| {ARMS[arm]} | {marks} | {end['gain']:.3f} | {end['majority']:.3f} | "
                     f"{'-' if end['nsp'] is None else format(end['nsp'], '.3f')} |")
    for (examples, epochs, pooling, rate), studies in transfer_groups(study).items():
        pooled = "" if pooling == "cls" else f", {pooling} pooling"
        lines += ["", f"| ChnSentiCorp dev, fine-tuned on {examples:,} reviews for {epochs} epochs{pooled} at lr "
                  f"{rate:g}, from | "
                  "seeds 0 / 1 / 2 | mean ± sd | against random weights (same settings) |", "|---|---|---|---|"]
        shared = studies[0]["random"]
        lines.append(f"| random weights | {seeds(shared)} | {mean_sd(shared)} | |")
        labels = [s["encoder"] + (", pooler re-initialised" if s["reinit_pooler"] else "") for s in studies]
        for s, label in zip(studies, labels):
            if s["random"] != shared:  # a study that ran its own random-weight runs, and they differ
                lines.append(f"| random weights (beside the next row) | {seeds(s['random'])} | {mean_sd(s['random'])} | |")
            if labels.count(label) > 1:  # the same encoder and settings in two studies: name their folders
                label += f" (`{s['folder']}`)"
            lines.append(f"| {label} | {seeds(s['pretrained'])} | {mean_sd(s['pretrained'])} | "
                         f"{100 * (statistics.mean(s['pretrained']) - statistics.mean(s['random'])):+.1f} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy, gain) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, curve in curves.items():
        steps = [p["step"] for p in curve]
        accuracy.plot(steps, [p["accuracy"] for p in curve], marker=".", label=f"masking {ARMS[arm]}")
        gain.plot(steps, [p["gain"] for p in curve], marker=".", label=f"masking {ARMS[arm]}")
    first = next(iter(curves.values()))
    accuracy.axhline(first[-1]["majority"], color="grey", linestyle=":", label="most frequent token")
    label_panels(accuracy, gain, "step", accuracy_title="validation MLM accuracy (characters masked at 15%)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, required=True, help="the study folder (ARM-metrics.csv, transfer/)")
    args = p.parse_args(argv)
    curves = {arm: validation_curve(args.study / f"{arm}-metrics.csv") for arm in ARMS
              if (args.study / f"{arm}-metrics.csv").is_file()}
    if not curves:
        raise SystemExit(f"chinese_report: no ARM-metrics.csv in {args.study}")
    plot(curves, args.study / "curves.png")
    (args.study / "table.md").write_text(table(args.study, curves))
    print((args.study / "table.md").read_text())


if __name__ == "__main__":
    main()
