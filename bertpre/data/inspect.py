"""``bertpre inspect``: the statistics of a prepared folder, printed and drawn.

The figure has three panels: the sequence-length histogram, the sentence labels per dataset
split (IsNext / NotNext for nsp, in order / swapped for sop; none has none), and the token-frequency curve (count against rank, log-log) counted over the
training split, with the share of [UNK] and the number of vocabulary entries never used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bertpre.data.prepared import PreparedData
from bertpre.data.summary import summary
from bertpre.errors import UserError
from bertpre.outputs import atomic_write, check_apart


def token_counts(prepared: PreparedData, split: str = "train", batch_rows: int = 65_536) -> np.ndarray:
    """Occurrences of every token id in a split, read batch by batch from the memory-mapped dataset."""
    dataset = prepared.load_dataset()[split]
    counts = np.zeros(prepared.vocab_size, dtype=np.int64)
    table = dataset.data  # pyarrow table backed by the memory-mapped Arrow files
    for batch in table.select(["input_ids"]).to_batches(max_chunksize=batch_rows):
        ids = batch.column(0).flatten().to_numpy(zero_copy_only=False)
        counts += np.bincount(ids, minlength=prepared.vocab_size)[: prepared.vocab_size]
    return counts


def _draw_labels(ax, record) -> None:
    """The sentence labels per split: IsNext / NotNext (nsp), in order / swapped (sop); none has none."""
    if record.objective == "none":
        ax.text(0.5, 0.5, "no sentence labels\n(--objective none: MLM only)", ha="center", va="center")
        ax.set(title="sentence labels", xticks=[], yticks=[])
        return
    kept, flipped = ("IsNext", "NotNext") if record.objective == "nsp" else ("in order", "swapped")
    names = [n for n, s in record.splits.items() if s.instances]
    flip = [record.splits[n].not_next for n in names]
    keep = [record.splits[n].instances - k for n, k in zip(names, flip)]
    ax.bar(names, keep, label=kept)
    ax.bar(names, flip, bottom=keep, label=flipped)
    for i, (a, b) in enumerate(zip(keep, flip)):
        ax.text(i, a + b, f"{100 * b / max(a + b, 1):.1f}% {flipped}", ha="center", va="bottom")
    title = "next-sentence labels" if record.objective == "nsp" else "sentence-order labels"
    ax.set(title=title, ylabel="pairs", ylim=(0, 1.2 * max(a + b for a, b in zip(keep, flip))))
    ax.legend(loc="upper right")


def inspect(path: str, plot: str | None = None) -> tuple[str, Path]:
    """Print-ready text and the path of the PNG written (default: ``<PATH>-report.png`` beside the
    prepared folder, never inside it: the folder holds data that other tools copy and read)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("bertpre inspect needs matplotlib: pip install matplotlib") from None
    if plot is not None:
        formats = plt.figure().canvas.get_supported_filetypes()
        plt.close("all")
        suffix = Path(plot).suffix.lower().lstrip(".")
        if suffix not in formats:
            raise UserError(f"--plot {plot}: not an image file name (use .png, .pdf or .svg)")
        if Path(plot).is_dir():
            raise UserError(f"--plot {plot} is a folder; name an image file")
    prepared = PreparedData(path, option="inspect")
    record = prepared.record
    counts = token_counts(prepared)
    special = set(record.tokenizer["special_ids"].values())
    ordinary = np.array([c for i, c in enumerate(counts) if i not in special])
    unused = int(np.count_nonzero(ordinary == 0))
    folder = prepared.path.resolve()
    out = Path(plot) if plot else folder.parent / f"{folder.name}-report.png"
    check_apart(out, [prepared.path], option="--plot")

    fig, (lengths, nsp, freq) = plt.subplots(1, 3, figsize=(15, 4.2))
    edges = record.histogram_edges
    lengths.bar(edges[:-1], record.total.length_counts, width=np.diff(edges), align="edge", edgecolor="black")
    lengths.set(title="sequence length", xlabel="tokens", ylabel="pairs (log scale)", yscale="log")
    _draw_labels(nsp, record)
    ranked = np.sort(ordinary[ordinary > 0])[::-1]
    freq.loglog(np.arange(1, len(ranked) + 1), ranked)
    freq.set(title=f"token frequency (train; {unused} of {len(ordinary)} ids unused)", xlabel="rank",
             ylabel="occurrences")
    fig.suptitle(str(prepared.path))
    fig.tight_layout()
    try:
        atomic_write(out, lambda f: fig.savefig(f, dpi=100, format=out.suffix.lstrip(".").lower() or "png"),
                     what=f"--plot {out}")
    finally:
        plt.close(fig)

    top = np.argsort(ordinary)[::-1][:10]
    vocab = {i: t for t, i in prepared.tokenizer.get_vocab().items()}
    ordinary_ids = [i for i in range(len(counts)) if i not in special]
    common = ", ".join(f"{vocab[ordinary_ids[i]]} {ordinary[i]}" for i in top)
    text = "\n".join([
        summary(record, prepared.path),
        f"  vocabulary  {unused} of {len(ordinary)} ordinary ids never used in train; most frequent: {common}",
        f"  figure      {out}",
    ])
    return text, out
