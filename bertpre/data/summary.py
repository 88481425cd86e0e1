"""The report ``bertpre prepare`` and ``bertpre combine`` print: what went in, how many pairs
(or sequences) came out, their labels and lengths, and the warnings a prepared folder deserves."""

from __future__ import annotations

from pathlib import Path

from bertpre.data.prepared import PrepareRecord


def summary(record: PrepareRecord, output: Path) -> str:
    """The one-screen report printed at the end of ``bertpre prepare``."""
    total, corpus, t = record.total, record.corpus, record.tokenizer
    train, validation = record.splits["train"], record.splits["validation"]
    peak = max(total.length_counts) or 1
    edges = record.histogram_edges
    bars = "\n".join(
        f"    {edges[i]:>4}-{edges[i + 1] - 1:<4} {'#' * (max(1, round(40 * n / peak)) if n else 0):<40} {n}"
        for i, n in enumerate(total.length_counts)
    )
    objective = record.objective
    not_next = record.fraction("not_next")
    warnings = _objective_warnings(record) if objective != "none" else []
    if validation.instances == 0:
        warnings.append("the validation split is empty (one document, or --validation-fraction 0): training "
                        "will run without validation; --doc-separator can split a file into documents")
    if record.truncated_token_fraction > 0.05:
        warnings.append(f"truncation to --max-seq-length dropped {total.truncated_tokens} tokens of text, "
                        f"{100 * record.truncated_token_fraction:.1f}% of what the pairs took (above 5%): pairs end "
                        "with the sentence that crosses the target length and are cut to --max-seq-length, as in "
                        "Google's BERT; a longer --max-seq-length loses less")
    requested = record.options.get("vocab_size")
    if t["trained"] and requested and t["vocab_size"] < requested // 2:
        warnings.append(f"the trained vocabulary has {t['vocab_size']} entries, far fewer than --vocab-size "
                        f"{requested}: the corpus is too small to learn a vocabulary from")
    if corpus.skipped_files:
        warnings.append(f"{len(corpus.skipped_files)} unreadable files were skipped (listed in prepare.json)")
    if corpus.invalid_utf8_bytes:
        warnings.append(f"{corpus.invalid_utf8_bytes} bytes were not valid UTF-8 and were replaced "
                        f"(per file in prepare.json)")
    lines = [
        f"prepared {output} in {record.seconds} s",
        f"  input       {corpus.files} files, {corpus.input_bytes / 1e6:.1f} MB, {corpus.documents} documents, "
        f"{total.sentences} sentences, {total.tokens} tokens",
        f"  tokenizer   {'trained' if t['trained'] else 'reused'}, vocab {t['vocab_size']}, "
        f"[UNK] rate {100 * record.unk_rate:.3f}%",
        f"  {'sequences' if objective == 'none' else 'pairs':<11} train {train.instances} ({train.documents} "
        f"documents), validation {validation.instances} ({validation.documents} documents); objective {objective}",
        _label_line(record, not_next),
        "  sequence lengths:",
        bars,
    ] + [f"  warning: {w}" for w in warnings]
    return "\n".join(lines)


def _objective_warnings(record: PrepareRecord) -> list[str]:
    """What the sentence objective's labels need and the corpus does not give."""
    total, validation = record.total, record.splits["validation"]
    warnings = []
    if record.objective == "sop":
        unpaired = total.unpaired_tokens / max(total.tokens, 1)
        if unpaired > 0.05:
            warnings.append(f"{100 * unpaired:.1f}% of the text is in no pair: sentence-order pairs need two "
                            f"sentences of one document, and {total.unpaired_documents} documents have one "
                            "(with lone last sentences, they are left out)")
        return warnings
    not_next, nsp_probability = record.fraction("not_next"), record.options["pairs"]["nsp_probability"]
    if total.documents < 2:
        warnings.append("only one document: NotNext partners come from that same document")
    if validation.documents == 1 and validation.instances:
        warnings.append("the validation split has one document, so its NotNext partners come from that same "
                        "document: val/nsp_accuracy then measures a harder task than training does "
                        "(more documents, e.g. with --doc-separator, avoid this)")
    if not_next > nsp_probability + 0.1:
        warnings.append(f"{100 * not_next:.1f}% of pairs are NotNext, not {100 * nsp_probability:.0f}%: "
                        "most chunks hold one sentence (documents of one sentence, or sentences longer than "
                        "--max-seq-length), and a one-sentence chunk always gets a random B")
    return warnings


def _label_line(record: PrepareRecord, not_next: float) -> str:
    total = record.total
    fill = total.sequence_tokens / max(total.instances * record.max_seq_length, 1)
    label = {"nsp": f"NotNext {100 * not_next:.1f}%", "sop": f"swapped {100 * not_next:.1f}%",
             "none": f"fill {100 * fill:.1f}% of --max-seq-length"}[record.objective]
    line = f"  {label}   short targets {100 * record.fraction('short_target'):.1f}%"
    if record.objective != "none":
        line += (f"   truncated {100 * record.fraction('truncated'):.1f}% of pairs, "
                 f"{100 * record.truncated_token_fraction:.1f}% of the text")
    return line
