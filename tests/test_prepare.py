import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE

from bertpre.errors import UserError
from bertpre.pairs import PairOptions
from bertpre.prepare import PrepareOptions, is_validation_document, prepare
from bertpre.prepared import PreparedData
from bertpre.tokenizer import load_tokenizer


def arrays(split) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    table = split.with_format("numpy")
    return list(table["input_ids"]), list(table["token_type_ids"]), np.asarray(table["next_sentence_label"])


def test_gutenberg_pairs_statistics(gutenberg_prepared):
    record = json.loads((gutenberg_prepared / "prepare.json").read_text())
    train = PreparedData(gutenberg_prepared).load_dataset()["train"]
    input_ids, token_types, labels = arrays(train)
    assert len(input_ids) > 15000
    assert abs(labels.mean() - 0.5) <= 0.02, "NotNext share"
    assert max(len(ids) for ids in input_ids) <= 128
    assert abs(record["statistics"]["short_target_fraction"] - 0.10) <= 0.02
    tokenizer = load_tokenizer(gutenberg_prepared)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    for ids, types in zip(input_ids, token_types):
        first_sep = int(np.flatnonzero(ids == sep)[0])
        assert ids[0] == cls and ids[-1] == sep and np.count_nonzero(ids == sep) == 2
        # segments are contiguous: 0 through the first [SEP], 1 after it
        assert not types[: first_sep + 1].any() and types[first_sep + 1 :].all()
    assert abs(record["statistics"]["not_next_fraction"] - 0.5) <= 0.02


def test_prepare_record(gutenberg_prepared):
    record = json.loads((gutenberg_prepared / "prepare.json").read_text())
    counts, stats = record["counts"], record["statistics"]
    assert record["schema_version"] == 2 and record["bertpre_version"]
    assert record["options"]["pairs"]["max_seq_length"] == 128 and record["options"]["seed"] == 12345
    assert counts["files"] == 15 and counts["documents"] == 15
    assert counts["instances"] == sum(s["instances"] for s in counts["splits"].values())
    assert counts["splits"]["validation"]["documents"] == 1  # ceil((15 - 1) * 0.05)
    assert sum(stats["length_histogram"]["counts"]) == counts["instances"]
    assert record["tokenizer"]["vocab_size"] == 8192
    assert 0 <= stats["unk_rate"] < 0.01
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
    assert record["tokenizer"]["trained"] is False
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
    split = record["split_stats"]["train"]
    used = split["pair_tokens"] - split["truncated_tokens"]  # the line's tokens that made it into pairs
    assert used >= 0.7 * split["tokens"], split
    assert 0.3 < record["statistics"]["not_next_fraction"] < 0.7, "pieces of the line pair up as IsNext too"
    from bertpre.prepared import summary

    assert "% of the text" in summary(record, tmp_path / "out")


def test_truncation_loss_is_counted_and_warned_about(gutenberg_prepared):
    """Google's pairing ends a chunk with the sentence that crosses the target length and cuts the
    pair to max_seq_length: on books at seq 128 that drops a measurable share of the text."""
    from bertpre.prepared import summary

    record = json.loads((gutenberg_prepared / "prepare.json").read_text())
    stats = record["statistics"]
    assert 0 < stats["truncated_tokens"] and 0.05 < stats["truncated_token_fraction"] < 0.3, stats
    assert any(line.startswith("  warning: truncation to --max-seq-length dropped")
               for line in summary(record, gutenberg_prepared).splitlines())


def test_a_corpus_too_small_for_its_vocabulary_is_warned_about(tmp_path):
    from bertpre.prepared import summary

    (tmp_path / "one.txt").write_text("Just one short sentence here.\n\nAnd a second document too.\n")
    record = prepare(PrepareOptions(inputs=[str(tmp_path / "one.txt")], output=tmp_path / "out", vocab_size=8192,
                                    validation_fraction=0.0))
    assert record["tokenizer"]["vocab_size"] < 200
    assert f"  warning: the trained vocabulary has {record['tokenizer']['vocab_size']} entries, far fewer than " \
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
    record = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert record["options"]["vocab_size"] == 1200 and record["options"]["seed"] == 5
    assert record["max_seq_length"] == 64
