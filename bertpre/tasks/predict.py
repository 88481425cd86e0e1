"""``bertpre predict``: label a table with a fine-tuned checkpoint (no Lightning)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from tqdm import tqdm

from bertpre.data.tokenizer import special_ids
from bertpre.errors import UserError
from bertpre.model.checkpoint import load_classifier
from bertpre.outputs import atomic_write, check_apart, check_replaceable, output_lock
from bertpre.tasks.table import collate, encode_rows, read_table
from bertpre.training.precision import resolve_device, use_tensor_cores


def predict_file(checkpoint_path: str | Path, input_path: str | Path, output_path: str | Path,
                 batch_size: int = 64, overwrite: bool = False, scores: bool = False, device: str = "auto") -> int:
    """Write ``prediction`` (with ``scores``: one ``p_<label>`` probability column per class)
    and the input's columns for every row of ``input_path`` (.tsv, .csv or .jsonl) as a TSV;
    returns the row count. ``device``: auto (the first GPU where torch sees one), cpu, cuda[:N]."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    check_apart(output_path, [input_path, checkpoint_path])
    check_replaceable(output_path, overwrite, "file")
    on = resolve_device(device)
    use_tensor_cores(on)
    model, tokenizer, task = load_classifier(checkpoint_path)
    model.to(on)
    rows = read_table(input_path)
    encoded = encode_rows(rows, str(input_path), tokenizer, task["columns"], labels=None)
    # longest first, so that a batch holds rows of about one length (little padding) and a batch too
    # large for the device fails at once; padding is masked, so a row's prediction is the same in any batch
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    probabilities = torch.empty(len(encoded), len(task["labels"]))  # (rows, labels), in the file's order
    pad = special_ids(tokenizer).pad
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="predicting", unit=" batch", disable=None,
                          mininterval=1.0, leave=False):
            rows_here = order[start : start + batch_size]
            batch = {k: v.to(on) for k, v in collate([encoded[i] for i in rows_here], pad).items()}
            logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # (B, labels)
            probabilities[rows_here] = logits.float().softmax(-1).cpu()
    labels = task["labels"]
    predictions = probabilities.argmax(-1).tolist()
    score_columns = [f"p_{label}" for label in labels] if scores else []

    def write(f) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.writer(text, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["prediction", *score_columns, *rows[0].keys()])
        for row, p, probs in zip(rows, predictions, probabilities.tolist()):
            shown = [f"{q:.6f}" for q in probs] if scores else []
            writer.writerow([labels[p], *shown, *row.values()])
        text.flush()
        text.detach()

    with output_lock(output_path):
        atomic_write(output_path, write, what=f"--output {output_path}")
    return len(rows)
