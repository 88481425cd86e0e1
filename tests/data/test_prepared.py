"""The prepared folder on disk: combining shards, reading split files memory-mapped."""

from pathlib import Path

import pyarrow as pa
import pytest
from conftest import SAMPLE, gutenberg_books

import bertpre.data.prepare
import bertpre.data.prepared
from bertpre.cli import main
from bertpre.data.prepare import PrepareOptions, prepare
from bertpre.data.prepared import PreparedData
from bertpre.errors import UserError


@pytest.mark.slow  # three preparations of the corpus, 10 s here; in CI's slow run
def test_shards_combine_into_one_training_folder(gutenberg_prepared, tmp_path, capsys):
    books = gutenberg_books()
    shards = []
    for index in range(3):
        shard = tmp_path / f"shard{index}"
        main(["prepare", "--input", *books, "--output", str(shard), "--tokenizer", str(gutenberg_prepared),
              "--shard-index", str(index), "--num-shards", "3"])
        shards.append(shard)
    records = [PreparedData(s).record for s in shards]
    assert [r.corpus.files for r in records] == [5, 5, 5]
    main(["combine", *map(str, shards), "--output", str(tmp_path / "all")])
    assert "prepared" in capsys.readouterr().out
    combined = PreparedData(tmp_path / "all")
    splits = combined.load_dataset()
    for name in ("train", "validation"):
        rows = [PreparedData(s).load_dataset()[name] for s in shards]
        assert len(splits[name]) == sum(len(r) for r in rows)
        assert splits[name][-1]["input_ids"] == rows[-1][-1]["input_ids"], "shards concatenated in order"
    record = combined.record
    assert record.corpus.files == 15 and record.total.tokens == sum(r.total.tokens for r in records)
    assert record.total.instances == len(splits["train"]) + len(splits["validation"])
    assert record.combined_from == [str(s) for s in shards]
    assert combined.fingerprint == PreparedData(gutenberg_prepared).fingerprint

    from bertpre.data.datamodule import PretrainDataModule

    data = PretrainDataModule(str(tmp_path / "all"), batch_size=8)
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["input_ids"].shape[0] == 8

    other = tmp_path / "other-vocab"
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=other, vocab_size=500))
    with pytest.raises(UserError, match=r"shard .*other-vocab: tokenizer differs from .*shard0"):
        bertpre.data.prepared.combine([str(shards[0]), str(other)], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="--num-shards needs --tokenizer"):
        PrepareOptions(inputs=books, output=tmp_path / "x", num_shards=2, shard_index=1)
    with pytest.raises(UserError, match=r"--num-shards 20 is more than the 15 input files"):
        prepare(PrepareOptions(inputs=books, output=tmp_path / "x", num_shards=20, tokenizer=str(gutenberg_prepared)))


def test_training_reads_the_dataset_memory_mapped(sample_prepared):
    from bertpre.data.datamodule import PretrainDataModule

    data = PretrainDataModule(str(sample_prepared), batch_size=16)
    data.setup("fit")
    train = data.splits["train"]
    assert train.cache_files and all(Path(f["filename"]).is_file() for f in train.cache_files)
    before = pa.total_allocated_bytes()
    batches = sum(1 for _ in data.train_dataloader())
    assert batches == len(train) // 16
    assert pa.total_allocated_bytes() - before < 1_000_000, "rows are read from the mapped file, not loaded"


def test_a_split_written_into_several_files_reads_as_one(sample_prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(bertpre.data.prepare, "BLOCK_CHARS", 100_000)  # one record batch per 100k characters
    one = tmp_path / "one"
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=one, tokenizer=str(sample_prepared)))
    monkeypatch.setattr(bertpre.data.prepared, "OUTPUT_FILE_BYTES", 200_000)
    many = tmp_path / "many"
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=many, tokenizer=str(sample_prepared)))
    assert len(PreparedData(one).split_files()["train"]) == 1
    assert len(PreparedData(many).split_files()["train"]) > 3
    a, b = PreparedData(one).load_dataset(), PreparedData(many).load_dataset()
    assert a["train"]["input_ids"] == b["train"]["input_ids"] and len(a["validation"]) == len(b["validation"])
