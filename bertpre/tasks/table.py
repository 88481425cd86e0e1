"""Task tables for ``bertpre finetune`` and ``bertpre predict``: TSV (GLUE's files as they are),
CSV or JSONL with a text column, an optional text-pair column and a label column; reading them,
choosing their columns, encoding rows and batching them.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bertpre.errors import UserError


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a .tsv, .csv or .jsonl file (first line of TSV/CSV is the header)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            rows = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        # a JSON null is a missing value, not the text "None"
                        rows.append({k: "" if v is None else str(v) for k, v in json.loads(line).items()})
                    except (json.JSONDecodeError, AttributeError):
                        raise UserError(f"{path}:{lineno}: not a JSON object") from None
            return rows
        if suffix not in (".tsv", ".csv"):
            raise UserError(f"{path}: expected a .tsv, .csv or .jsonl file")
        csv.field_size_limit(sys.maxsize)
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if suffix == ".tsv" else (",", csv.QUOTE_MINIMAL)
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        rows = []
        for row in reader:
            if None in row or None in row.values():  # DictReader's marks of a row longer or shorter than the header
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise UserError(f"{path}:{reader.line_num}: {fields} fields, but the header has "
                                f"{len(reader.fieldnames)}")
            rows.append(row)
        return rows


def pick_column(rows: list[dict[str, str]], names: str | list[str], path: str, option: str) -> str:
    candidates = [names] if isinstance(names, str) else list(names)
    available = list(rows[0]) if rows else []
    for name in candidates:
        if name in available:
            return name
    raise UserError(f"{path}: no column {' or '.join(map(repr, candidates))} (columns: {', '.join(available)}; "
                    f"set {option})")


def sample_rows(rows: list[dict[str, str]], count: int, seed: int) -> list[dict[str, str]]:
    """A random subset of ``count`` rows in file order; the same seed gives the same subset."""
    if count >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [rows[i] for i in sorted(order[:count].tolist())]


def encode_rows(rows, path, tokenizer: Tokenizer, columns: dict, labels: list[str] | None):
    """(ids, token types, label index or -1) per row, truncated to max_seq_length."""
    if not rows:
        raise UserError(f"{path}: no rows")
    text = pick_column(rows, columns["text_column"], path, "data.text_column")
    pair = pick_column(rows, columns["text_pair_column"], path, "data.text_pair_column") \
        if columns["text_pair_column"] else None
    if labels is not None:  # a labelled file (training or validation) must have the label column
        pick_column(rows, columns["label_column"], path, "data.label_column")
    empty = [number for number, r in enumerate(rows, 1) if not r[text].strip()]  # data rows, from 1
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        print(f"bertpre: warning: {path}: {len(empty)} of {len(rows)} rows have an empty {text!r} "
              f"(rows {shown}); they are kept", file=sys.stderr, flush=True)
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.enable_truncation(columns["max_seq_length"], strategy="longest_first")
    inputs = [(r[text], r[pair]) if pair else r[text] for r in rows]
    encodings = tokenizer.encode_batch(inputs)
    index = {label: i for i, label in enumerate(labels or [])}
    out = []
    for lineno, (row, enc) in enumerate(zip(rows, encodings), 2):
        label = row.get(columns["label_column"])
        if labels is not None and label is not None and label not in index:
            raise UserError(f"{path}:{lineno}: label {label!r} is not one of the training labels {labels}")
        out.append((enc.ids, enc.type_ids, index.get(label, -1)))
    return out


def collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_types, _) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        types[i, : len(row_types)] = torch.tensor(row_types)
        mask[i, : len(row_ids)] = 1
    labels = torch.tensor([label for _, _, label in rows], dtype=torch.long)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


