"""Write the text of a labelled task file as a pretraining corpus, labels dropped.

    python data_prep/task_text.py ../shared/data/tasks/sst2/train.tsv --output out/sst2-text/train.txt

The output is in `bertpre prepare --format lines` form: one sentence per line, a blank line
between documents. A task's sentences are unrelated to each other, so next-sentence prediction
on them carries no signal whatever the grouping; grouping `--sentences-per-document` of them
into one document lets a pair hold several short sentences instead of one sentence and padding.
A task whose cells hold several sentences each (reviews: ChnSentiCorp) takes `--split-sentences`:
each cell is split as `bertpre prepare` splits prose (Chinese at 。！？, English by blingfire), and
`--sentences-per-document` then counts cells, so that `--sentences-per-document 1` makes each review
one document of its own sentences.
Use only a task's training file: text from its dev or test file would leak into the evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertpre.data.sentences import split_sentences
from bertpre.errors import UserError
from bertpre.tasks.table import pick_column, read_table


def task_documents(path: Path, column: str, per_document: int, split: bool = False) -> list[list[str]]:
    """The ``column`` of a task file (read as `bertpre finetune` reads it), whitespace collapsed,
    empty cells skipped, in groups of ``per_document`` cells; with ``split``, each cell's sentences."""
    rows = read_table(path)
    column = pick_column(rows, column, str(path), "--column")
    cells = [" ".join(row[column].split()) for row in rows if row[column].strip()]
    groups = [cells[i:i + per_document] for i in range(0, len(cells), per_document)]
    if split:
        return [[s for cell in group for s in split_sentences(cell)] for group in groups]
    return groups


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task_file", type=Path, help="a .tsv, .csv or .jsonl task file, as `bertpre finetune` reads "
                                                "(e.g. SST-2's train.tsv)")
    p.add_argument("--output", type=Path, required=True, help="the corpus file to write (refused if it exists)")
    p.add_argument("--column", default="sentence", help="the column holding the text")
    p.add_argument("--sentences-per-document", type=int, default=8,
                   help="cells per document (default 8)")
    p.add_argument("--split-sentences", action="store_true",
                   help="split each cell into its sentences (a cell holds a review, not one sentence)")
    args = p.parse_args(argv)
    if args.sentences_per_document < 1:
        sys.exit("task_text: --sentences-per-document must be at least 1")
    if args.output.exists():
        sys.exit(f"task_text: {args.output} exists; choose another --output")
    try:
        documents = task_documents(args.task_file, args.column, args.sentences_per_document,
                                   args.split_sentences)
    except UserError as e:
        sys.exit(f"task_text: {e}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_text("".join("\n".join(d) + "\n\n" for d in documents), encoding="utf-8")
    partial.replace(args.output)
    print(f"{args.output}: {sum(map(len, documents))} sentences in {len(documents)} documents")


if __name__ == "__main__":
    main()
