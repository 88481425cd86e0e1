"""bertpre prepare: Google's pairs on real books, the record, options, and the pipeline at scale
(processes, shards, input formats, unreadable files, long lines, interruption)."""

import bz2
import gzip
import hashlib
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SAMPLE, gutenberg_books

import bertpre.data.prepare
from bertpre.cli import main
from bertpre.data.corpus import CorpusOptions
from bertpre.data.pairs import PairOptions
from bertpre.data.prepare import PrepareOptions, is_validation_document, prepare
from bertpre.data.prepared import SPLITS, PreparedData, PrepareRecord
from bertpre.data.tokenizer import load_tokenizer
from bertpre.errors import UserError


def flat_column(split, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of every row at once: (all values in row order, row offsets (rows + 1,))."""
    column = split.data.column(name).combine_chunks()
    return np.asarray(column.flatten()), np.asarray(column.offsets)


def test_gutenberg_pairs_statistics(gutenberg_prepared):
    record = PrepareRecord.read(gutenberg_prepared / "prepare.json")
    train = PreparedData(gutenberg_prepared).load_dataset()["train"]
    ids, offsets = flat_column(train, "input_ids")  # every row's tokens, one after another
    types, type_offsets = flat_column(train, "token_type_ids")
    labels = np.asarray(train.data.column("next_sentence_label"))
    lengths = np.diff(offsets)
    assert len(lengths) > 15000 and np.array_equal(type_offsets, offsets)
    assert abs(labels.mean() - 0.5) <= 0.02, "NotNext share"
    assert lengths.max() <= 128
    assert abs(record.fraction("short_target") - 0.10) <= 0.02
    tokenizer = load_tokenizer(gutenberg_prepared)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    starts = offsets[:-1]
    assert (ids[starts] == cls).all() and (ids[offsets[1:] - 1] == sep).all()
    is_sep = ids == sep
    assert (np.add.reduceat(is_sep, starts) == 2).all(), "a row without exactly two [SEP]"
    # segments are contiguous: 0 through the first [SEP], 1 after it (a token is in segment B when
    # a [SEP] of its row comes before it)
    seps_before = np.cumsum(is_sep) - is_sep  # [SEP]s before each token, counted from the first row
    seps_before -= np.repeat(seps_before[starts], lengths)  # ... from its own row's start
    assert np.array_equal(types, (seps_before > 0).astype(types.dtype))
    assert abs(record.fraction("not_next") - 0.5) <= 0.02


def leaf_paths(value, path=()) -> list[tuple[str, ...]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in leaf_paths(item, (*path, key))]
    return [path]


def test_prepare_record(gutenberg_prepared):
    stored = json.loads((gutenberg_prepared / "prepare.json").read_text())
    record = PrepareRecord.read(gutenberg_prepared / "prepare.json")
    assert stored["schema_version"] == 3 and stored["bertpre_version"]
    # every value once: what earlier records held twice has one place, and derived figures are not stored
    paths = leaf_paths(stored)
    for name, only in (("max_seq_length", ("options", "pairs")), ("static_masking", ("options",)),
                       ("skipped_files", ("corpus",)), ("invalid_utf8_bytes", ("corpus",))):
        assert [p[:-1] for p in paths if p[-1] == name] == [only], name
    assert [p for p in paths if p[-1] == "truncated_tokens"] == [("splits", s, "truncated_tokens") for s in SPLITS]
    assert set(stored) == {"schema_version", "bertpre_version", "seconds", "options", "tokenizer", "corpus", "splits"}
    assert record.max_seq_length == 128 and record.options["seed"] == 12345
    assert record.corpus.files == 15 and record.corpus.documents == 15
    assert record.splits["validation"].documents == 1  # ceil((15 - 1) * 0.05)
    total = record.total
    assert sum(total.length_counts) == total.instances == sum(s.instances for s in record.splits.values())
    assert len(record.histogram_edges) == len(total.length_counts) + 1
    assert record.tokenizer["vocab_size"] == 8192
    assert 0 <= record.unk_rate < 0.01
    assert (gutenberg_prepared / "tokenizer.json").is_file() and (gutenberg_prepared / "vocab.txt").is_file()
    vocab = (gutenberg_prepared / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_validation_documents_are_spread_and_counted():
    chosen = [i for i in range(101) if is_validation_document(i, 0.05)]
    assert chosen == [1, 21, 41, 61, 81]
    assert sum(is_validation_document(i, 0.3) for i in range(11)) == 3
    assert not any(is_validation_document(i, 0.0) for i in range(10))
    assert not is_validation_document(0, 0.5), "a one-document corpus keeps its document for training"


def test_splits_share_no_document(tmp_path):
    # One-sentence-per-line documents made of unique numbers: every pair traces back to its documents.
    corpus = tmp_path / "numbers.txt"
    corpus.write_text("\n\n".join("\n".join(f"d{d}s{s} w{d}x{s} y." for s in range(6)) for d in range(40)) + "\n")
    out = tmp_path / "out"
    prepare(PrepareOptions(inputs=[str(corpus)], output=out, vocab_size=500, validation_fraction=0.25,
                           pairs=PairOptions(max_seq_length=32)))
    tokenizer = load_tokenizer(out)
    splits = PreparedData(out).load_dataset()
    seen = {}
    for name in ("train", "validation"):
        text = " ".join(tokenizer.decode(list(ids)) for ids in splits[name]["input_ids"])
        seen[name] = {int(token[1:].split("s")[0]) for token in text.split() if token.startswith("d") and "s" in token}
    assert seen["validation"] == {1, 5, 9, 13, 17, 21, 25, 29, 33, 37}
    assert not seen["train"] & seen["validation"]


def dataset_digest(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((out / "dataset").rglob("*.arrow")):
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_inputs_and_seed_give_the_same_dataset(tmp_path):
    options = dict(inputs=[str(SAMPLE / "carroll-alice.txt"), str(SAMPLE / "shakespeare-caesar.txt")],
                   vocab_size=1000, pairs=PairOptions(max_seq_length=64))
    prepare(PrepareOptions(output=tmp_path / "a", **options))
    prepare(PrepareOptions(output=tmp_path / "b", **options))
    prepare(PrepareOptions(output=tmp_path / "c", seed=7, **options))
    assert (tmp_path / "a" / "vocab.txt").read_text() == (tmp_path / "b" / "vocab.txt").read_text()
    assert dataset_digest(tmp_path / "a") == dataset_digest(tmp_path / "b")
    assert dataset_digest(tmp_path / "a") != dataset_digest(tmp_path / "c")


def test_reusing_a_tokenizer_from_an_earlier_output(sample_prepared, tmp_path):
    out = tmp_path / "again"
    record = prepare(PrepareOptions(inputs=[str(SAMPLE / "carroll-alice.txt")], output=out,
                                    tokenizer=str(sample_prepared), pairs=PairOptions(max_seq_length=64)))
    assert record.tokenizer["trained"] is False
    assert (out / "vocab.txt").read_text() == (sample_prepared / "vocab.txt").read_text()


def test_static_masking_stores_dupe_factor_differently_masked_copies(sample_prepared, tmp_path):
    out = tmp_path / "static"
    prepare(PrepareOptions(inputs=[str(SAMPLE / "carroll-alice.txt")], output=out, tokenizer=str(sample_prepared),
                           pairs=PairOptions(max_seq_length=64), static_masking=True, dupe_factor=3))
    single = tmp_path / "single"
    prepare(PrepareOptions(inputs=[str(SAMPLE / "carroll-alice.txt")], output=single, tokenizer=str(sample_prepared),
                           pairs=PairOptions(max_seq_length=64), static_masking=True))
    train = PreparedData(out).load_dataset()["train"]
    one = PreparedData(single).load_dataset()["train"]
    assert abs(len(train) / len(one) - 3) < 0.1
    mask_id = load_tokenizer(sample_prepared).token_to_id("[MASK]")
    masked = 0
    for row in train.select(range(200)):
        ids, positions, originals = (np.array(row[k]) for k in ("input_ids", "masked_lm_positions", "masked_lm_ids"))
        assert len(positions) >= 1 and len(positions) == len(originals)
        assert (ids[np.setdiff1d(np.arange(len(ids)), positions)] != mask_id).all()
        masked += np.count_nonzero(ids[positions] == mask_id)
    assert masked > 0


def test_output_is_not_overwritten_without_asking(sample_prepared):
    before = (sample_prepared / "prepare.json").read_text()
    with pytest.raises(UserError, match="exists and is not empty .*--overwrite"):
        prepare(PrepareOptions(inputs=[str(SAMPLE)], output=sample_prepared))
    assert (sample_prepared / "prepare.json").read_text() == before


def test_empty_corpus_is_refused_and_leaves_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="corpus is empty"):
        prepare(PrepareOptions(inputs=[str(empty)], output=out))
    assert not out.exists()
    assert not list(tmp_path.glob(".out*")), "no staging folder left behind"


def test_a_sentence_longer_than_a_pair_is_split_not_truncated_away(sample_prepared, tmp_path, capsys):
    """A 40,000-word line without a sentence end: its text goes into pairs, not into one
    truncated pair; the summary states how much text truncation dropped."""
    words = " ".join(f"word{i % 500} and more" for i in range(40_000 // 3))
    (tmp_path / "long.txt").write_text(words + "\n")
    record = prepare(PrepareOptions(inputs=[str(tmp_path / "long.txt")], output=tmp_path / "out",
                                    tokenizer=str(sample_prepared), validation_fraction=0.0,
                                    pairs=PairOptions(max_seq_length=64)))
    split = record.splits["train"]
    used = split.pair_tokens - split.truncated_tokens  # the line's tokens that made it into pairs
    assert used >= 0.7 * split.tokens, split
    assert 0.3 < record.fraction("not_next") < 0.7, "pieces of the line pair up as IsNext too"
    from bertpre.data.summary import summary

    assert "% of the text" in summary(record, tmp_path / "out")


def test_truncation_loss_is_counted_and_warned_about(gutenberg_prepared):
    """Google's pairing ends a chunk with the sentence that crosses the target length and cuts the
    pair to max_seq_length: on books at seq 128 that drops a measurable share of the text."""
    from bertpre.data.summary import summary

    record = PrepareRecord.read(gutenberg_prepared / "prepare.json")
    assert 0 < record.total.truncated_tokens and 0.05 < record.truncated_token_fraction < 0.3, record.total
    assert any(line.startswith("  warning: truncation to --max-seq-length dropped")
               for line in summary(record, gutenberg_prepared).splitlines())


def test_a_corpus_too_small_for_its_vocabulary_is_warned_about(tmp_path):
    from bertpre.data.summary import summary

    (tmp_path / "one.txt").write_text("Just one short sentence here.\n\nAnd a second document too.\n")
    record = prepare(PrepareOptions(inputs=[str(tmp_path / "one.txt")], output=tmp_path / "out", vocab_size=8192,
                                    validation_fraction=0.0))
    assert record.tokenizer["vocab_size"] < 200
    assert f"  warning: the trained vocabulary has {record.tokenizer['vocab_size']} entries, far fewer than " \
           "--vocab-size 8192: the corpus is too small to learn a vocabulary from" in summary(record, tmp_path / "out")


def test_prepare_reads_its_options_from_a_yaml_file(tmp_path, capsys):
    import yaml
    from conftest import SAMPLE

    from bertpre.cli import main

    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump({"input": [str(SAMPLE / "carroll-alice.txt")], "output": str(tmp_path / "out"),
                                      "vocab_size": 1200, "max_seq_length": 64, "seed": 5}))
    with pytest.raises(SystemExit) as exited:
        main(["prepare", "--config", str(config), "--seed", "9", "--print_config"])
    assert exited.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["vocab_size"] == 1200 and printed["seed"] == 9 and printed["max_seq_length"] == 64
    main(["prepare", "--config", str(config), "--num-proc", "1"])
    record = PrepareRecord.read(tmp_path / "out" / "prepare.json")
    assert record.options["vocab_size"] == 1200 and record.options["seed"] == 5
    assert record.max_seq_length == 64


def test_a_folder_prepared_with_schema_2_reads_as_the_same_record(sample_prepared, tmp_path):
    """Schema 2 had the same data files and a record that held some values twice; it still trains."""
    import shutil

    current = PreparedData(sample_prepared).record
    old = tmp_path / "old"
    shutil.copytree(sample_prepared, old)
    stored = json.loads((sample_prepared / "prepare.json").read_text())
    total = current.total
    stored.update(schema_version=2, split_stats=stored.pop("splits"), max_seq_length=current.max_seq_length,
                  static_masking=current.static_masking,
                  counts={"files": current.corpus.files, "instances": total.instances},
                  statistics={"not_next_fraction": round(current.fraction("not_next"), 4)})
    (old / "prepare.json").write_text(json.dumps(stored))
    again = PreparedData(old)
    assert again.record == current and again.max_seq_length == current.max_seq_length
    assert len(again.load_dataset()["train"]) == total.instances - current.splits["validation"].instances
    (old / "prepare.json").write_text(json.dumps({**stored, "splits": None, "split_stats": {}}))
    with pytest.raises(UserError, match=r"^data.path .*old: not a complete prepare record"):
        PreparedData(old)


def arrow_bytes(prepared: Path) -> dict[str, bytes]:
    return {str(p.relative_to(prepared)): p.read_bytes() for p in sorted((prepared / "dataset").rglob("*.arrow"))}


@pytest.mark.slow  # two preparations of 6 MB, 11 s here; in CI's slow run
def test_any_number_of_processes_gives_the_same_bytes(gutenberg_prepared, tmp_path, monkeypatch):
    books = [b for b in gutenberg_books() if "bible" not in b]  # 14 books, 6 MB
    monkeypatch.setattr(bertpre.data.prepare, "BLOCK_CHARS", 250_000)  # about 25 blocks, several in flight
    outputs = {}
    for num_proc in (1, 2):
        out = tmp_path / f"n{num_proc}"
        record = prepare(PrepareOptions(inputs=books, output=out, tokenizer=str(gutenberg_prepared),
                                        num_proc=num_proc, dupe_factor=2, static_masking=True))
        outputs[num_proc] = arrow_bytes(out)
        assert record.splits["train"].instances > 20_000
    assert outputs[1] == outputs[2]


def test_tables_and_compressed_files_give_the_same_pairs(sample_prepared, tmp_path):
    documents = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(SAMPLE.glob("*.txt"))]
    (tmp_path / "jsonl").mkdir()
    with (tmp_path / "jsonl" / "docs.jsonl").open("w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    table = pa.table({"id": list(range(len(documents))), "text": documents})
    (tmp_path / "parquet").mkdir()
    pq.write_table(table, tmp_path / "parquet" / "docs.parquet", row_group_size=1)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "compressed").mkdir()
    for name, opener, part in (("a.jsonl.gz", gzip.open, documents[:2]), ("b.jsonl.bz2", bz2.open, documents[2:]),
                               ("c.jsonl.xz", lzma.open, [])):
        with opener(tmp_path / "compressed" / name, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in part)
    results = {}
    for name in ("jsonl", "parquet", "saved", "compressed"):
        out = tmp_path / f"out-{name}"
        record = prepare(PrepareOptions(inputs=[str(tmp_path / name)], output=out, tokenizer=str(sample_prepared),
                                        validation_fraction=0.3))
        assert record.corpus.documents == len(documents), name
        results[name] = [v for k, v in sorted(arrow_bytes(out).items())]
    assert results["jsonl"] == results["parquet"] == results["saved"] == results["compressed"]
    with pytest.raises(UserError, match=r"docs.parquet: no column 'body' \(columns: id, text; set --text-field\)"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "parquet")], output=tmp_path / "x",
                               tokenizer=str(sample_prepared), corpus=CorpusOptions(text_field="body")))


def test_unreadable_files_stop_the_run_or_are_skipped_and_counted(sample_prepared, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for book in sorted(SAMPLE.glob("*.txt")):
        (corpus / book.name).write_bytes(book.read_bytes())
    (corpus / "broken.txt.gz").write_bytes(gzip.compress(next(SAMPLE.glob("*.txt")).read_bytes())[:5000])
    (corpus / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    args = ["prepare", "--input", str(corpus), "--output", str(tmp_path / "out"), "--tokenizer", str(sample_prepared)]
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err.strip()
    assert err.endswith("(--skip-unreadable skips such files)") and "broken.txt.gz: cannot read" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
    main([*args, "--skip-unreadable"])
    out = capsys.readouterr().out
    assert "warning: 2 unreadable files were skipped" in out
    skipped = PreparedData(tmp_path / "out").record.corpus.skipped_files
    assert len(skipped) == 2 and "binary file" in " ".join(skipped) and "broken.txt.gz" in " ".join(skipped)


def _peak_rss_mb(argv: list[str]) -> float:
    """Peak RSS of a fresh `bertpre` process (with --num-proc 1, one process does all the work)."""
    code = ("import resource, sys; from bertpre.cli import main; main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return float(done.stdout.rsplit("PEAK", 1)[1])


@pytest.mark.slow  # minutes of the default suite's five; runs in CI's slow line
def test_a_10_mb_line_is_read_without_a_memory_blowup(sample_prepared, tmp_path):
    words = (SAMPLE / sorted(os.listdir(SAMPLE))[0]).read_text(encoding="utf-8").split()
    line = " ".join(words * (10_000_000 // len(" ".join(words)) + 1))[:10_000_000]
    normal = tmp_path / "normal.txt"
    normal.write_text("\n".join(line[i : i + 100] for i in range(0, len(line), 100)) + "\n")
    huge = tmp_path / "huge.txt"
    huge.write_text("First sentence.\n" + line + "\nLast sentence.\n")
    peaks = {}
    for name, path in (("normal", normal), ("huge", huge)):
        for fmt in ("lines", "prose"):
            out = tmp_path / f"{name}-{fmt}"
            peaks[name, fmt] = _peak_rss_mb(["prepare", "--input", str(path), "--output", str(out), "--tokenizer",
                                             str(sample_prepared), "--num-proc", "1", "--format", fmt])
            assert PreparedData(out).record.total.instances > 0
    for fmt in ("lines", "prose"):
        assert peaks["huge", fmt] < peaks["normal", fmt] + 400, peaks  # a few copies of the line, not more


@pytest.mark.slow  # a real SIGKILL and three preparations of the corpus: 12 s; in CI's slow line
def test_an_interrupted_prepare_leaves_nothing_complete_and_a_rerun_finishes(gutenberg_prepared, tmp_path):
    out = tmp_path / "prepared"
    argv = [sys.executable, "-m", "bertpre.cli", "prepare", "--input", *gutenberg_books(), "--output", str(out),
            "--tokenizer", str(gutenberg_prepared), "--num-proc", "2"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    staging = tmp_path / ".prepared.partial"
    deadline = time.monotonic() + 60
    first_output = staging / "dataset" / "train-00000.arrow"
    while not first_output.exists() or first_output.stat().st_size == 0:
        assert time.monotonic() < deadline and process.poll() is None, "prepare ended before it could be killed"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the main process and its workers, as a scheduler would
    process.wait()
    assert not out.exists(), "a killed prepare must not leave a folder that looks complete"
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    assert not staging.exists() and (out / "prepare.json").is_file()
    reference = tmp_path / "reference"
    prepare(PrepareOptions(inputs=gutenberg_books(), output=reference, tokenizer=str(gutenberg_prepared)))
    assert arrow_bytes(out) == arrow_bytes(reference)


def test_bad_scale_options_are_refused(tmp_path):
    with pytest.raises(UserError, match="--num-proc must be at least 1, got 0"):
        PrepareOptions(inputs=["x"], output=tmp_path, num_proc=0)
    with pytest.raises(UserError, match=r"--shard-index must be in \[0, --num-shards\), got 3 of 3"):
        PrepareOptions(inputs=["x"], output=tmp_path, shard_index=3, num_shards=3, tokenizer="t")
    with pytest.raises(UserError, match="--tokenizer-sample-mb must be positive, got 0"):
        PrepareOptions(inputs=["x"], output=tmp_path, tokenizer_sample_mb=0)


@pytest.mark.slow  # minutes of the default suite's five; runs in CI's slow line
def test_the_prepare_benchmark_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "bench_prepare.py"), "--corpus", str(SAMPLE),
                           "--repeat", "2", "--num-proc", "1", "--vocab-size", "1000", "--json",
                           str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["input_bytes"]["2x"] > results["input_bytes"]["1x"] > 0
    for name in ("prepare lines 1x --num-proc 1", "prepare lines 2x --num-proc 1", "prepare prose 1x --num-proc 1"):
        assert results[name]["mb_per_s"] > 0 and results[name]["peak_pss_mb"] > 0, name
