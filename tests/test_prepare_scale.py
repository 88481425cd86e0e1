"""Data preparation at scale: fast tokenization, processes, shards, inputs, bad files, interruption."""

import bz2
import gzip
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
from conftest import ROOT, SAMPLE, WIKITEXT, gutenberg_books
from tokenizers import Tokenizer, pre_tokenizers

import bertpre.prepare
import bertpre.prepared
from bertpre.cli import main
from bertpre.corpus import CorpusOptions, CorpusStats, expand_inputs, read_documents
from bertpre.errors import UserError
from bertpre.prepare import PrepareOptions, prepare, tokenizer_sample
from bertpre.prepared import PreparedData
from bertpre.tokenizer import (
    _DELETED_WHITESPACE,
    SentenceEncoder,
    load_tokenizer,
    train_tokenizer,
    word_cacheable,
)

ODD_TEXT = [
    "a\x1cb c\u2028d e\x0bf\x85g h\x0ci Caf\u00e9 NA\u00cfVE \u4e2d\u6587\u5b57 x\u200by " + "z" * 150,
    "", "   ", "[MASK] hello[SEP]x", "\x00\ufffd a\ufffdb", "tab\tsep\u3000ideographic\u00a0nbsp",
    "it's (quoted) \"words\" -- dashes... and 3.14 numbers!",
]


def arrow_bytes(prepared: Path) -> dict[str, bytes]:
    return {str(p.relative_to(prepared)): p.read_bytes() for p in sorted((prepared / "dataset").rglob("*.arrow"))}


def direct_ids(tokenizer: Tokenizer, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
    ids = np.array([i for e in encodings for i in e.ids], dtype=np.int32)
    return ids, np.array([len(e.ids) for e in encodings])


@pytest.mark.parametrize("cased", [False, True])
def test_word_cache_gives_the_tokenizers_ids(gutenberg_prepared, cased):
    wikitext = [line.strip() for line in (WIKITEXT / "valid.txt").read_text(encoding="utf-8").splitlines()]
    books = [s for d in read_documents(expand_inputs(gutenberg_books()[:4]), CorpusOptions(), CorpusStats()) for s in d]
    tokenizer = train_tokenizer(books[:20000], 4000, lowercase=not cased)
    sentences = books + wikitext + ODD_TEXT
    encoder = SentenceEncoder(tokenizer)
    assert encoder.cached
    for _ in range(2):  # a cold and a warm cache
        ids, counts = encoder.encode(sentences)
        expected_ids, expected_counts = direct_ids(tokenizer, sentences)
        assert np.array_equal(counts, expected_counts) and np.array_equal(ids, expected_ids)
    small = SentenceEncoder(tokenizer, max_cached_chars=1000)  # emptied again and again
    for start in range(0, 3000, 500):
        ids, counts = small.encode(sentences[start : start + 500])
        assert np.array_equal(ids, direct_ids(tokenizer, sentences[start : start + 500])[0])


def test_words_are_split_only_where_the_tokenizer_splits(gutenberg_prepared):
    tokenizer = load_tokenizer(gutenberg_prepared)
    whitespace = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and chr(c).isspace()]
    deleted = {c for c in whitespace
               if len(tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(f"a{c}b"))) != 2}
    assert deleted == {c for c in whitespace if _DELETED_WHITESPACE.fullmatch(c)}


def test_other_tokenizers_are_encoded_sentence_by_sentence(gutenberg_prepared):
    tokenizer = load_tokenizer(gutenberg_prepared)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.Digits()])
    encoder = SentenceEncoder(tokenizer)
    assert not word_cacheable(tokenizer) and not encoder.cached
    ids, counts = encoder.encode(ODD_TEXT)
    expected_ids, expected_counts = direct_ids(tokenizer, ODD_TEXT)
    assert np.array_equal(ids, expected_ids) and np.array_equal(counts, expected_counts)


def test_any_number_of_processes_gives_the_same_bytes(gutenberg_prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(bertpre.prepare, "BLOCK_CHARS", 400_000)  # about 25 blocks, several in flight
    outputs = {}
    for num_proc in (1, 2):
        out = tmp_path / f"n{num_proc}"
        record = prepare(PrepareOptions(inputs=gutenberg_books(), output=out, tokenizer=str(gutenberg_prepared),
                                        num_proc=num_proc, dupe_factor=2, static_masking=True))
        outputs[num_proc] = arrow_bytes(out)
        assert record["split_stats"]["train"]["instances"] > 40_000
    assert outputs[1] == outputs[2]


def test_shards_combine_into_one_training_folder(gutenberg_prepared, tmp_path, capsys):
    books = gutenberg_books()
    shards = []
    for index in range(3):
        shard = tmp_path / f"shard{index}"
        main(["prepare", "--input", *books, "--output", str(shard), "--tokenizer", str(gutenberg_prepared),
              "--shard-index", str(index), "--num-shards", "3"])
        shards.append(shard)
    records = [json.loads((s / "prepare.json").read_text()) for s in shards]
    assert [r["counts"]["files"] for r in records] == [5, 5, 5]
    main(["combine", *map(str, shards), "--output", str(tmp_path / "all")])
    assert "prepared" in capsys.readouterr().out
    combined = PreparedData(tmp_path / "all")
    splits = combined.load_dataset()
    for name in ("train", "validation"):
        rows = [PreparedData(s).load_dataset()[name] for s in shards]
        assert len(splits[name]) == sum(len(r) for r in rows)
        assert splits[name][-1]["input_ids"] == rows[-1][-1]["input_ids"], "shards concatenated in order"
    record = combined.record
    assert record["counts"]["files"] == 15 and record["counts"]["tokens"] == sum(r["counts"]["tokens"] for r in records)
    assert record["counts"]["instances"] == len(splits["train"]) + len(splits["validation"])
    assert combined.fingerprint == PreparedData(gutenberg_prepared).fingerprint

    from bertpre.data import PretrainDataModule

    data = PretrainDataModule(str(tmp_path / "all"), batch_size=8)
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["input_ids"].shape[0] == 8

    other = tmp_path / "other-vocab"
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=other, vocab_size=500))
    with pytest.raises(UserError, match=r"shard .*other-vocab: tokenizer differs from .*shard0"):
        bertpre.prepared.combine([str(shards[0]), str(other)], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="--num-shards needs --tokenizer"):
        PrepareOptions(inputs=books, output=tmp_path / "x", num_shards=2, shard_index=1)
    with pytest.raises(UserError, match=r"--num-shards 20 is more than the 15 input files"):
        prepare(PrepareOptions(inputs=books, output=tmp_path / "x", num_shards=20, tokenizer=str(gutenberg_prepared)))


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
        assert record["counts"]["documents"] == len(documents), name
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
    skipped = json.loads((tmp_path / "out" / "prepare.json").read_text())["statistics"]["skipped_files"]
    assert len(skipped) == 2 and "binary file" in " ".join(skipped) and "broken.txt.gz" in " ".join(skipped)


def _peak_rss_mb(argv: list[str]) -> float:
    """Peak RSS of a fresh `bertpre` process (with --num-proc 1, one process does all the work)."""
    code = ("import resource, sys; from bertpre.cli import main; main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return float(done.stdout.rsplit("PEAK", 1)[1])


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
            assert json.loads((out / "prepare.json").read_text())["counts"]["instances"] > 0
    for fmt in ("lines", "prose"):
        assert peaks["huge", fmt] < peaks["normal", fmt] + 400, peaks  # a few copies of the line, not more


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


def test_tokenizer_sample_is_bounded_seeded_and_trainable_alone(tmp_path, capsys):
    books = expand_inputs(gutenberg_books())
    options = CorpusOptions()
    sample = tokenizer_sample(books, options, sample_mb=1.0, seed=1)
    assert sample == tokenizer_sample(books, options, sample_mb=1.0, seed=1)
    assert sample != tokenizer_sample(books, options, sample_mb=1.0, seed=2)
    largest_document = max(sum(map(len, d)) for d in read_documents(books, options, CorpusStats()))
    assert 800_000 < sum(map(len, sample)) < 1_000_000 + largest_document
    assert len({s[:20] for s in sample[:100]}) > 50, "a spread of sentences, not one run"
    main(["tokenizer", "--input", *map(str, books), "--output", str(tmp_path / "tok"), "--vocab-size", "3000",
          "--tokenizer-sample-mb", "2"])
    assert "sample" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tok").get_vocab_size() == 3000


def test_inspect_prints_statistics_and_draws_them(sample_prepared, tmp_path, capsys):
    main(["inspect", str(sample_prepared), "--plot", str(tmp_path / "report.png")])
    out = capsys.readouterr().out
    assert "NotNext" in out and "never used in train" in out and str(tmp_path / "report.png") in out
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from bertpre.report import token_counts

    prepared = PreparedData(sample_prepared)
    counts = token_counts(prepared)
    train = prepared.load_dataset()["train"]
    assert counts.sum() == sum(len(ids) for ids in train["input_ids"])
    assert counts[prepared.tokenizer.token_to_id("[CLS]")] == len(train)


def test_training_reads_the_dataset_memory_mapped(sample_prepared):
    from bertpre.data import PretrainDataModule

    data = PretrainDataModule(str(sample_prepared), batch_size=16)
    data.setup("fit")
    train = data.splits["train"]
    assert train.cache_files and all(Path(f["filename"]).is_file() for f in train.cache_files)
    before = pa.total_allocated_bytes()
    batches = sum(1 for _ in data.train_dataloader())
    assert batches == len(train) // 16
    assert pa.total_allocated_bytes() - before < 1_000_000, "rows are read from the mapped file, not loaded"


def test_bad_scale_options_are_refused(tmp_path):
    with pytest.raises(UserError, match="--num-proc must be at least 1, got 0"):
        PrepareOptions(inputs=["x"], output=tmp_path, num_proc=0)
    with pytest.raises(UserError, match=r"--shard-index must be in \[0, --num-shards\), got 3 of 3"):
        PrepareOptions(inputs=["x"], output=tmp_path, shard_index=3, num_shards=3, tokenizer="t")
    with pytest.raises(UserError, match="--tokenizer-sample-mb must be positive, got 0"):
        PrepareOptions(inputs=["x"], output=tmp_path, tokenizer_sample_mb=0)


def test_a_split_written_into_several_files_reads_as_one(sample_prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(bertpre.prepare, "BLOCK_CHARS", 100_000)  # one record batch per 100k characters
    one = tmp_path / "one"
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=one, tokenizer=str(sample_prepared)))
    monkeypatch.setattr(bertpre.prepared, "OUTPUT_FILE_BYTES", 200_000)
    many = tmp_path / "many"
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=many, tokenizer=str(sample_prepared)))
    assert len(PreparedData(one).split_files()["train"]) == 1
    assert len(PreparedData(many).split_files()["train"]) > 3
    a, b = PreparedData(one).load_dataset(), PreparedData(many).load_dataset()
    assert a["train"]["input_ids"] == b["train"]["input_ids"] and len(a["validation"]) == len(b["validation"])


def test_the_prepare_benchmark_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "data_prep" / "bench_prepare.py"), "--corpus", str(SAMPLE),
                           "--repeat", "2", "--num-proc", "1", "--vocab-size", "1000", "--json",
                           str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["input_bytes"]["2x"] > results["input_bytes"]["1x"] > 0
    for name in ("prepare lines 1x --num-proc 1", "prepare lines 2x --num-proc 1", "prepare prose 1x --num-proc 1"):
        assert results[name]["mb_per_s"] > 0 and results[name]["peak_pss_mb"] > 0, name


def test_inspect_draws_beside_the_folder_never_into_it(sample_prepared, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_prepared, data)
    before = sorted(p.name for p in data.rglob("*"))
    main(["inspect", str(data)])
    assert (tmp_path / "data-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "data-report.png") in capsys.readouterr().out
    assert sorted(p.name for p in data.rglob("*")) == before
    with pytest.raises(SystemExit):
        main(["inspect", str(data), "--plot", str(data / "figure.png")])
    assert "--plot" in capsys.readouterr().err and not (data / "figure.png").exists()
