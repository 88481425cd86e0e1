"""Chinese data measurements (issue 30): what the word segmenter costs `bertpre prepare`, and
whether the stored word boundaries are the segmenter's words.

    python -m studies.chinese_data --corpus ../shared/data/corpora/chinese-novels --output studies/chinese-wwm
    python -m studies.chinese_data --corpus ../shared/data/corpora/chinese-novels --output studies/chinese-wwm \
        --words-in out/novels-64     # the word check alone, on a folder prepared with the segmenter

0. Segmenters: rjieba against jieba (if installed) on the corpus's lines, MB/s and words made.
1. Speed: `bertpre prepare --tokenizer T` (a tokenizer trained once first, so that its training
   is not timed) on the corpus, without and with `--word-segmenter rjieba`, at each --num-proc,
   each a separate process timed from start to exit, best of --repeat; throughput is input MB
   (10^6 bytes) per second of wall time.
2. Words: in the folder prepared with the segmenter, every group of two or more Chinese characters
   joined by `word_continues` is checked against the segmenter's words of the corpus's sentences;
   and, over --batches dynamic whole-word-masked batches, every masked Chinese word is checked to
   be masked whole (the share of masked groups that are exactly one segmenter word).

Writes chinese-data.json and prints a table. Run alone: two jobs on 2 cores distort both.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bertpre.data.cjk import is_cjk
from bertpre.data.corpus import CorpusOptions, CorpusStats, expand_inputs, read_documents
from bertpre.data.masking import IGNORE_INDEX, Masker, MaskingCollator
from bertpre.data.prepared import PreparedData
from bertpre.data.words import WordOptions, WordSegmenter, word_groups


def run_prepare(corpus: Path, output: Path, tokenizer: Path | None, extra: list[str]) -> float:
    argv = [sys.executable, "-m", "bertpre.cli", "prepare", "--input", str(corpus), "--output", str(output),
            "--overwrite", "--max-seq-length", "64", "--doc-separator", "^第.+回", "--vocab-size", "8192",
            *(["--tokenizer", str(tokenizer)] if tokenizer else []), *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"chinese_data: prepare failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def segmenter_speed(corpus: Path) -> list[dict]:
    """rjieba against jieba (when installed; it is not a dependency) on the corpus's lines, one call per
    line: MB/s and the number of words each makes."""
    import rjieba

    lines = [line for path in expand_inputs([str(corpus)]) for line in
             path.read_text(encoding="utf-8").splitlines() if line.strip()]
    size = sum(len(line.encode()) for line in lines) / 1e6
    cutters = {"rjieba": rjieba.cut}
    try:
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        cutters["jieba"] = jieba.lcut
    except ImportError:
        pass
    results = []
    for name, cut in cutters.items():
        start = time.perf_counter()
        words = sum(len(cut(line)) for line in lines)
        seconds = time.perf_counter() - start
        results.append({"segmenter": name, "words": words, "seconds": round(seconds, 2), "mb_per_s": round(size / seconds, 2)})
    return results


def segmenter_words(corpus: Path) -> set[str]:
    """Every word the segmenter makes of the corpus's sentences."""
    segmenter = WordSegmenter(WordOptions("rjieba"))
    words: set[str] = set()
    options = CorpusOptions(doc_separator="^第.+回")
    for document in read_documents(expand_inputs([str(corpus)]), options, CorpusStats()):
        for sentence in document:
            index = segmenter.word_of_character(sentence)
            cuts = [0, *(np.flatnonzero(np.diff(index)) + 1), len(sentence)]
            words.update(sentence[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
    return words


def chinese_groups(tokens: list[str], continues: np.ndarray) -> list[list[int]]:
    """Positions of each word made of Chinese characters, by the stored boundaries."""
    groups: dict[int, list[int]] = {}
    for position, group in enumerate(word_groups(np.asarray(continues).astype(bool))):
        groups.setdefault(int(group), []).append(position)
    return [g for g in groups.values() if all(len(tokens[p]) == 1 and is_cjk(tokens[p]) for p in g)]


def check_words(folder: Path, corpus: Path, batches: int) -> dict:
    prepared = PreparedData(folder)
    train = prepared.load_dataset()["train"].with_format("numpy")
    vocab = [prepared.tokenizer.id_to_token(i) for i in range(prepared.vocab_size)]
    words = segmenter_words(corpus)
    stored = stored_found = 0
    for row in train.select(range(min(len(train), 20000))):
        tokens = [vocab[i] for i in row["input_ids"]]
        for group in chinese_groups(tokens, row["word_continues"]):
            if len(group) > 1:
                stored += 1
                stored_found += "".join(tokens[p] for p in group) in words
    collate = MaskingCollator(Masker.from_tokenizer(prepared.tokenizer, 26, 0.4, whole_word=True))
    rng = np.random.default_rng(0)
    masked_groups = one_word = partial = 0
    for _ in range(batches):
        # draw numbers make the collator's masks a function of them (reproducible), as in training
        examples = [dict(train[int(i)], draw=int(i)) for i in rng.choice(len(train), 64, replace=False)]
        labels = collate(examples)["labels"].numpy()
        for row, example in enumerate(examples):
            predicted = labels[row, : len(example["input_ids"])] != IGNORE_INDEX
            tokens = [vocab[i] for i in example["input_ids"]]
            for group in chinese_groups(tokens, example["word_continues"]):
                if predicted[group].any():
                    masked_groups += 1
                    partial += not predicted[group].all()
                    one_word += predicted[group].all() and "".join(tokens[p] for p in group) in words
    return {"stored_multi_character_groups": stored, "stored_groups_that_are_segmenter_words": stored_found,
            "masked_chinese_groups": masked_groups, "masked_groups_exactly_one_segmenter_word": one_word,
            "masked_groups_masked_in_part": partial}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--words-in", type=Path, default=None, metavar="PREPARED_DIR",
                   help="only the word check, on this folder (prepared from --corpus with the segmenter)")
    args = p.parse_args()
    if args.words_in:
        words = check_words(args.words_in, args.corpus, args.batches)
        print(json.dumps(words, indent=1))
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "word-check.json").write_text(json.dumps(words, indent=1) + "\n", encoding="utf-8")
        return
    size = sum(path.stat().st_size for path in expand_inputs([str(args.corpus)]))
    results: dict = {"corpus": str(args.corpus), "input_mb": size / 1e6, "machine": platform.processor() or
                     platform.machine(), "segmenters": segmenter_speed(args.corpus), "speed": []}
    print(results["segmenters"], flush=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        run_prepare(args.corpus, work / "tokenizer", None, ["--num-proc", "2"])
        for proc in args.num_proc:
            for segmenter in (False, True):
                extra = ["--num-proc", str(proc), *(["--word-segmenter", "rjieba"] if segmenter else [])]
                best = min(run_prepare(args.corpus, work / "out", work / "tokenizer", extra) for _ in range(args.repeat))
                results["speed"].append({"num_proc": proc, "segmenter": segmenter, "seconds": round(best, 2),
                                         "mb_per_s": round(size / 1e6 / best, 2)})
                print(results["speed"][-1], flush=True)
        results["words"] = check_words(work / "out", args.corpus, args.batches)
    print(json.dumps(results["words"], indent=1))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "chinese-data.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
