"""Write a corpus as one sentence per line with blank lines between documents (Google's format).

    python data_prep/to_sentence_lines.py INPUT [INPUT ...] --output FILE [--doc-separator REGEX]

Inputs are read exactly as `bertpre prepare` reads them (same format detection and
sentence splitter), so the output holds the same documents and sentences.
"""

from __future__ import annotations

import argparse
import sys

from bertpre.data.corpus import CorpusOptions, CorpusStats, expand_inputs, read_documents
from bertpre.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--output", required=True)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--doc-separator", default=None)
    args = parser.parse_args()
    try:
        options = CorpusOptions(args.format, args.text_field, args.doc_separator)
        stats = CorpusStats()
        with open(args.output, "w", encoding="utf-8") as out:
            for document in read_documents(expand_inputs(args.inputs), options, stats):
                out.write("\n".join(document) + "\n\n")
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"{args.output}: {stats.documents} documents, {stats.sentences} sentences from {stats.files} files")


if __name__ == "__main__":
    main()
