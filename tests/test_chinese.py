"""Chinese in and out, on real text (tests/fixtures/chinese/README.md): sentence splitting, encodings,
segmenter word boundaries and whole-word masking, combine, the export's fill-mask, fine-tuning."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bertpre.cli import main
from bertpre.data.cjk import is_cjk
from bertpre.data.corpus import CorpusOptions, CorpusStats, read_documents
from bertpre.data.masking import IGNORE_INDEX, Masker, MaskingCollator
from bertpre.data.pairs import PairOptions
from bertpre.data.prepare import PrepareOptions, prepare
from bertpre.data.prepared import PreparedData, combine
from bertpre.data.sentences import split_sentences
from bertpre.data.words import WordOptions, WordSegmenter
from bertpre.errors import UserError
from studies.chinese_data import chinese_groups, segmenter_words  # the study's measure, tested here

pytest.importorskip("rjieba")

HERE = Path(__file__).parent / "fixtures" / "chinese"
NOVEL = HERE / "hongloumeng-ch1.txt"
REVIEWS = HERE / "chnsenticorp-200.tsv"
CLOSING = "”’」』）》"


def novel_paragraphs() -> list[str]:
    return [line.strip() for line in NOVEL.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_chinese_sentences_end_at_their_marks_and_keep_their_closing_quotes():
    paragraph = "却说甄士隐俱听得明白，遂不禁上前施礼，笑问道：“二位仙师请了。”那僧道也忙答礼相问。真的吗？好……走吧！"
    assert split_sentences(paragraph) == ["却说甄士隐俱听得明白，遂不禁上前施礼，笑问道：“二位仙师请了。”",
                                          "那僧道也忙答礼相问。", "真的吗？", "好……", "走吧！"]
    for paragraph in novel_paragraphs():  # the whole chapter: no text lost, no sentence opens with a closer
        sentences = split_sentences(paragraph)
        assert "".join(sentences).replace(" ", "") == "".join(paragraph.split())
        assert not any(s[0] in CLOSING for s in sentences)
        assert all(s[-1] in "。！？…" + CLOSING for s in sentences[:-1]), sentences


def test_mixed_chinese_and_english_keeps_english_sentence_splitting():
    text = "房间很干净。The staff spoke English. Breakfast was fine! 下次还来。"
    assert split_sentences(text) == ["房间很干净。", "The staff spoke English.", "Breakfast was fine!", "下次还来。"]
    english = "The king spoke. The queen answered!"
    assert split_sentences(english) == ["The king spoke.", "The queen answered!"]  # English alone: unchanged path


def test_wrapped_chinese_lines_join_without_a_space():
    assert split_sentences("他说：“好\n  的。” 然后\n走了。") == ["他说：“好的。”", "然后走了。"]


def test_task_text_splits_each_review_into_one_document_of_its_sentences():
    from data_prep.task_text import task_documents  # the script that turns a task's text into a corpus

    rows = REVIEWS.read_text(encoding="utf-8").splitlines()[1:]
    reviews = ["".join(row.split("\t", 1)[1].split()) for row in rows]
    documents = task_documents(REVIEWS, "sentence", 1, split=True)
    assert len(documents) == len(reviews)  # one document a review, none merged or lost
    assert ["".join(d).replace(" ", "") for d in documents] == reviews
    assert sum(len(d) > 1 for d in documents) > len(documents) // 2  # most reviews hold several sentences
    unsplit = task_documents(REVIEWS, "sentence", 8)  # without split: 8 whole cells a document, as before
    assert [len(d) for d in unsplit] == [8] * (len(reviews) // 8) + ([len(reviews) % 8] if len(reviews) % 8 else [])


def read(path: Path, **options) -> list[list[str]]:
    return list(read_documents([path], CorpusOptions(**options), CorpusStats()))


def test_gb18030_text_is_refused_in_one_line_naming_the_option_and_read_with_it(tmp_path):
    gbk = tmp_path / "novel-gbk.txt"
    gbk.write_bytes(NOVEL.read_text(encoding="utf-8").encode("gb18030"))
    with pytest.raises(UserError, match=r"novel-gbk.txt: not UTF-8 .*--encoding gb18030") as error:
        read(gbk)
    assert "\n" not in str(error.value)
    assert read(gbk, encoding="gb18030") == read(NOVEL)


def test_utf16_with_a_byte_order_mark_is_read_as_text(tmp_path):
    wide = tmp_path / "novel-utf16.txt"
    wide.write_bytes(NOVEL.read_text(encoding="utf-8").encode("utf-16"))
    assert read(wide) == read(NOVEL)
    no_bom = tmp_path / "novel-utf16le.txt"
    no_bom.write_bytes(NOVEL.read_text(encoding="utf-8").encode("utf-16-le"))
    with pytest.raises(UserError, match="--encoding utf-16-le"):
        read(no_bom)


def test_a_gbk_part_in_a_utf8_file_is_refused_and_nothing_is_written(tmp_path):
    text = NOVEL.read_text(encoding="utf-8")
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(text.encode("utf-8") * 4 + text[:2000].encode("gb18030"))  # past the 64 KiB sniffed
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"mixed.txt: \d+ bytes are not valid utf-8"):
        prepare(PrepareOptions(inputs=[str(mixed)], output=out, vocab_size=500, num_proc=1))
    assert not out.exists() and mixed.read_bytes().startswith(text[:100].encode("utf-8"))


def test_unknown_encoding_and_punctuation_only_input_get_one_line(tmp_path):
    with pytest.raises(UserError, match="--encoding: unknown encoding 'gbk2'"):
        CorpusOptions(encoding="gbk2")
    marks = tmp_path / "marks.txt"
    marks.write_text("。。。！！？\n\n……“”\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        prepare(PrepareOptions(inputs=[str(marks)], output=tmp_path / "out", vocab_size=500, num_proc=1))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def novel_prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("novel") / "wwm"
    prepare(PrepareOptions(inputs=[str(NOVEL)], output=out, vocab_size=3000, validation_fraction=0.0, num_proc=1,
                           pairs=PairOptions(max_seq_length=64), words=WordOptions("rjieba"), dupe_factor=3))
    return out


def test_stored_boundaries_are_the_segmenters_words(novel_prepared):
    prepared = PreparedData(novel_prepared)
    assert prepared.record.options["words"]["segmenter"] == "rjieba" and prepared.record.options["words"]["version"]
    train = prepared.load_dataset()["train"]
    words = segmenter_words(NOVEL)
    multi, found = 0, 0
    for ids, continues in zip(train["input_ids"], train["word_continues"]):
        tokens = [prepared.tokenizer.id_to_token(i) for i in ids]
        for group in chinese_groups(tokens, np.asarray(continues)):
            if len(group) > 1:
                multi += 1
                found += "".join(tokens[p] for p in group) in words
    assert multi > 1000 and found / multi >= 0.99, (found, multi)


def masked_examples(prepared: PreparedData, masker: Masker, batches: int = 30):
    """(example, predicted) for each sequence of ``batches`` batches of 32 training pairs drawn at
    random (seed 0), masked afresh by ``masker``; predicted: (length,) bool."""
    train = prepared.load_dataset()["train"].with_format("numpy")
    rows = [train[i] for i in range(len(train))]
    collate = MaskingCollator(masker)
    rng = np.random.default_rng(0)
    for _ in range(batches):
        examples = [rows[i] for i in rng.choice(len(rows), 32, replace=False)]
        labels = collate(examples)["labels"].numpy()
        for row, example in enumerate(examples):
            yield example, labels[row, : len(example["input_ids"])] != IGNORE_INDEX


def test_whole_word_masking_masks_every_character_of_a_chosen_word(novel_prepared):
    prepared = PreparedData(novel_prepared)
    tokens = {i: prepared.tokenizer.id_to_token(i) for i in range(prepared.vocab_size)}
    results = {}
    for whole_word in (True, False):
        complete = partial = masked = total = 0
        masker = Masker.from_tokenizer(prepared.tokenizer, 26, 0.4, whole_word=whole_word)
        for example, predicted in masked_examples(prepared, masker):
            masked += predicted.sum()
            total += len(example["input_ids"])
            names = [tokens[int(i)] for i in example["input_ids"]]
            for group in chinese_groups(names, example["word_continues"]):
                if len(group) > 1 and predicted[group].any():
                    complete += predicted[group].all()
                    partial += not predicted[group].all()
        results[whole_word] = (complete, partial, masked / total)
    complete, partial, rate = results[True]
    assert complete > 2000 and partial == 0, results
    assert 0.36 <= rate <= 0.41, rate  # the budget stays the configured rate (0.4; a word may not fit the rest)
    assert results[False][1] > results[False][0], "character masking should mostly split words"


def test_ngram_whole_word_masking_masks_runs_of_whole_words(novel_prepared):
    """MacBERT's n-gram masking over segmenter words: no word is masked in part, the rate holds, and
    masked runs span several words far more often than with single words."""
    prepared = PreparedData(novel_prepared)
    specials = [prepared.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]")]
    results = {}
    for max_ngram in (1, 4):
        partial = masked = total = runs = multi_word_runs = 0
        masker = Masker.from_tokenizer(prepared.tokenizer, 10, 0.15, whole_word=True, max_ngram=max_ngram)
        for example, predicted in masked_examples(prepared, masker):
            masked += predicted.sum()
            total += len(example["input_ids"])
            continues = np.asarray(example["word_continues"], dtype=bool)
            special = np.isin(example["input_ids"], specials)
            continues[1:] &= ~special[:-1]  # a word never runs across [SEP]
            word = np.cumsum(~continues | special)
            for w in np.unique(word[predicted]):
                partial += not predicted[word == w].all()
            edges = np.flatnonzero(np.diff(np.concatenate([[0], predicted.astype(np.int8), [0]])))
            for start, end in zip(edges[::2], edges[1::2]):
                runs += 1
                multi_word_runs += len(np.unique(word[start:end])) > 1
        results[max_ngram] = (partial, masked / total, multi_word_runs / runs)
    assert results[1][0] == 0 and results[4][0] == 0, results
    assert 0.13 <= results[4][1] <= 0.16, results  # the budget: 15%, a word may not fit the rest
    assert results[4][2] > 2 * results[1][2] and results[4][2] > 0.4, results


def test_static_whole_word_masks_are_whole_words_and_survive_combine(novel_prepared, tmp_path):
    copy = tmp_path / "copy.txt"
    copy.write_bytes(NOVEL.read_bytes())
    shards = []
    for index in (0, 1):
        shard = tmp_path / f"shard{index}"
        prepare(PrepareOptions(inputs=[str(NOVEL), str(copy)], output=shard, tokenizer=str(novel_prepared),
                               num_shards=2, shard_index=index, validation_fraction=0.0, num_proc=1, seed=index,
                               pairs=PairOptions(max_seq_length=64), words=WordOptions("rjieba"),
                               static_masking=True, whole_word_masking=True))
        shards.append(shard)
    combine([str(s) for s in shards], tmp_path / "combined")
    combined = PreparedData(tmp_path / "combined")
    train = combined.load_dataset()["train"]
    assert combined.record.word_segmenter == "rjieba"
    assert len(train) == sum(len(PreparedData(s).load_dataset()["train"]) for s in shards)
    checked = 0
    for row in train:
        positions = set(row["masked_lm_positions"])
        ids = np.asarray(row["input_ids"])
        ids[row["masked_lm_positions"]] = row["masked_lm_ids"]  # the text before masking
        names = [combined.tokenizer.id_to_token(int(i)) for i in ids]
        for group in chinese_groups(names, np.asarray(row["word_continues"])):
            chosen = [p in positions for p in group]
            assert all(chosen) or not any(chosen), (names, group)
            checked += any(chosen) and len(group) > 1
    assert checked > 100
    plain = tmp_path / "plain"
    prepare(PrepareOptions(inputs=[str(NOVEL), str(copy)], output=plain, tokenizer=str(novel_prepared), num_shards=2,
                           shard_index=1, validation_fraction=0.0, num_proc=1, pairs=PairOptions(max_seq_length=64),
                           static_masking=True))
    with pytest.raises(UserError, match="word boundaries differs"):
        combine([str(shards[0]), str(plain)], tmp_path / "mixed")


def test_static_ngram_masks_are_recorded_and_span_words(novel_prepared, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--input", str(NOVEL), "--output", str(tmp_path / "dynamic"), "--max-ngram", "3"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--max-ngram" in err and "--static-masking" in err
    assert not (tmp_path / "dynamic").exists()
    out = tmp_path / "static"
    main(["prepare", "--input", str(NOVEL), "--output", str(out), "--tokenizer", str(novel_prepared),
          "--max-seq-length", "64", "--validation-fraction", "0", "--num-proc", "1", "--word-segmenter", "rjieba",
          "--static-masking", "--whole-word-masking", "--max-ngram", "3"])
    prepared = PreparedData(out)
    assert prepared.record.options["max_ngram"] == 3
    runs = multi_word = 0
    for row in prepared.load_dataset()["train"]:
        predicted = np.zeros(len(row["input_ids"]), dtype=np.int8)
        predicted[row["masked_lm_positions"]] = 1
        word = np.cumsum(~np.asarray(row["word_continues"], dtype=bool))
        edges = np.flatnonzero(np.diff(np.concatenate([[0], predicted, [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            runs += 1
            multi_word += len(np.unique(word[start:end])) > 1
    assert runs > 100 and multi_word / runs > 0.3, (multi_word, runs)


def test_a_user_dictionary_joins_a_domain_word_and_bad_lines_are_named(tmp_path):
    sentence = "甄士隐梦幻识通灵"
    plain = WordSegmenter(WordOptions("rjieba")).word_of_character(sentence)
    assert len(set(plain[4:8])) > 1  # 识通灵 is not one word to the segmenter's own dictionary
    user = tmp_path / "words.txt"
    user.write_text("梦幻识通灵 1000 n\n", encoding="utf-8")
    joined = WordSegmenter(WordOptions("rjieba", str(user))).word_of_character(sentence)
    assert len(set(joined[3:8])) == 1
    bad = tmp_path / "bad.txt"
    bad.write_text("通灵 often n\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.txt:1: expected 'word \[frequency\] \[tag\]'"):
        WordSegmenter(WordOptions("rjieba", str(bad)))
    with pytest.raises(UserError, match="--user-dict needs --word-segmenter"):
        WordOptions(None, str(user))
    with pytest.raises(UserError, match="--word-segmenter must be one of rjieba"):
        WordOptions("ltp")


def test_a_missing_segmenter_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "rjieba", None)  # import fails as if not installed
    with pytest.raises(SystemExit):
        main(["prepare", "--input", str(NOVEL), "--output", str(tmp_path / "out"), "--word-segmenter", "rjieba"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'bertpre[zh]'" in err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def chinese_checkpoint(novel_prepared, tmp_path_factory) -> Path:
    from conftest import ROOT

    run = tmp_path_factory.mktemp("zh-run")
    main(["train", "--config", str(ROOT / "configs" / "bert-mini-zh-cpu.yaml"), "--data.path", str(novel_prepared),
          "--trainer.default_root_dir", str(run), "--trainer.max_time", "null", "--trainer.max_steps", "6",
          "--model.schedule_by", "steps", "--data.batch_size", "16", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false"])
    return run / "checkpoints" / "last.ckpt"


def test_the_export_fills_masks_with_chinese_characters(chinese_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    from bertpre.model.export import export_checkpoint

    out = export_checkpoint(chinese_checkpoint, tmp_path / "hf")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(out))
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenize_chinese_chars"] is True
    assert tokenizer.tokenize("甄士隐梦幻") == ["甄", "士", "隐", "梦", "幻"]
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), top_k=20)
    guesses = [g["token_str"] for g in fill("士隐因说道：适闻仙师所谈因[MASK]，实人世罕闻者。")]
    assert sum(len(g) == 1 and is_cjk(g) for g in guesses) >= 10, guesses


def test_finetune_and_predict_read_chinese_tsv(chinese_checkpoint, tmp_path, capsys):
    from conftest import ROOT

    run = tmp_path / "finetune"
    main(["finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained",
          str(chinese_checkpoint), "--data.train_file", str(REVIEWS), "--data.validation_file", str(REVIEWS),
          "--data.batch_size", "32", "--data.max_train_examples", "64", "--trainer.max_epochs", "1",
          "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar",
          "false"])
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "val/accuracy" in out, out  # 64 of the 200 reviews in batches of 32
    reviews = tmp_path / "reviews.tsv"
    reviews.write_text("sentence\n房间很干净，服务也很好。\n太吵了，再也不来了。\n", encoding="utf-8")
    main(["predict", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--input", str(reviews),
          "--output", str(tmp_path / "out.tsv")])
    rows = (tmp_path / "out.tsv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and "房间很干净，服务也很好。" in rows[1] and rows[0].split("\t")[0] == "prediction"


def test_whole_word_masking_on_chinese_data_without_boundaries_warns(novel_prepared, tmp_path, capsys):
    from bertpre.data.datamodule import PretrainDataModule

    plain = tmp_path / "plain"
    prepare(PrepareOptions(inputs=[str(NOVEL)], output=plain, tokenizer=str(novel_prepared), validation_fraction=0.0,
                           num_proc=1, pairs=PairOptions(max_seq_length=64)))
    for path, warned in ((plain, True), (novel_prepared, False)):
        data = PretrainDataModule(str(path), batch_size=4, whole_word_masking=True, val_whole_word_masking=False)
        data.setup("fit")
        assert ("--word-segmenter rjieba" in capsys.readouterr().out) is warned
        assert data.masker.continuation is not None and data.val_masker.continuation is None


@pytest.mark.slow  # three training runs of the shipped Chinese config, 8.5 s here; in CI's slow run
def test_a_resumed_run_masks_the_same_whole_words(novel_prepared, tmp_path):
    """Word boundaries survive a resume: a run resumed from its step-4 checkpoint logs the same losses at
    steps 4-7 as the uninterrupted run, which a run masking characters does not."""
    import csv

    import yaml
    from conftest import ROOT

    def run(name: str, *extra: str) -> Path:
        config = yaml.safe_load((ROOT / "configs" / "bert-mini-zh-cpu.yaml").read_text(encoding="utf-8"))
        config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=4, save_top_k=-1)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        folder = tmp_path / name
        main(["train", "--config", str(path), "--data.path", str(novel_prepared), "--trainer.default_root_dir",
              str(folder), "--trainer.max_time", "null", "--trainer.max_steps", "8", "--model.schedule_by", "steps",
              "--data.batch_size", "8", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
              "--trainer.enable_progress_bar", "false", *extra])
        return folder

    def losses(folder: Path, version: int) -> dict[int, float]:
        rows = csv.DictReader((folder / "logs" / f"version_{version}" / "metrics.csv").open())
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}

    words = run("words")
    reference = losses(words, 0)
    step4 = next((words / "checkpoints").glob("*step=4.ckpt"))
    run("words", "--ckpt_path", str(step4))
    resumed = losses(words, 1)
    assert sorted(resumed) == [4, 5, 6, 7], resumed
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)
    characters = losses(run("characters", "--data.whole_word_masking", "false"), 0)
    assert all(characters[s] != reference[s] for s in resumed), (characters, reference)


def test_the_study_report_reads_both_arms_and_the_transfer_runs(tmp_path):
    """studies/chinese_report on the committed arm metrics and transfer results.json files: the table's 8k
    accuracies are the CSVs' last validations; each transfer row is its seeds' mean against the random
    weights fine-tuned with the same settings (reviews, epochs, pooling, learning rate), one table per setting."""
    import csv
    import shutil

    from conftest import ROOT

    from studies import chinese_report

    study = ROOT / "studies" / "chinese-wwm"
    for arm in ("wwm", "char"):
        shutil.copy(study / f"{arm}-metrics.csv", tmp_path / f"{arm}-metrics.csv")
    runs = [{"seed": s, "random_init": r, "final_accuracy": a, "learning_rate": 3e-4}
            for s, r, a in ((0, True, 0.80), (1, True, 0.82), (2, True, 0.84), (0, False, 0.85), (1, False, 0.86),
                            (2, False, 0.90))]

    def study_of(folder, arm, runs, examples=2000, pooling="cls", **more):
        (tmp_path / "transfer" / folder).mkdir(parents=True)
        options = {"checkpoint": f"runs/zh-study/{arm}/checkpoints/last.ckpt", "examples": str(examples),
                   "epochs": "5", "pooling": pooling, **more}
        (tmp_path / "transfer" / folder / "results.json").write_text(json.dumps({"options": options, "runs": runs}))

    study_of("wwm-tapt", "wwm-tapt", runs)
    study_of("wwm-tapt-reinit", "wwm-tapt", [dict(r, final_accuracy=r["final_accuracy"] + (0.0 if r["random_init"]
                                                                                          else 0.01)) for r in runs],
             reinit_pooler="True")
    study_of("char-tapt-mean", "char-tapt", [dict(r, final_accuracy=r["final_accuracy"] + (0.03 if r["random_init"]
                                                                                          else 0.0)) for r in runs],
             pooling="mean")
    study_of("wwm-tapt-rerun", "wwm-tapt", [dict(r, final_accuracy=r["final_accuracy"] + (0.02 if r["random_init"]
                                                                                         else 0.0)) for r in runs])
    study_of("char-500", "char", [dict(r, final_accuracy=r["final_accuracy"] - 0.1) for r in runs], examples=500)
    study_of("char-tapt-lr1e-4", "char-tapt", [dict(r, learning_rate=1e-4, final_accuracy=r["final_accuracy"] - (
        0.05 if r["random_init"] else 0.0)) for r in runs])
    chinese_report.main(["--study", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    for arm in ("wwm", "char"):
        rows = [r for r in csv.DictReader((tmp_path / f"{arm}-metrics.csv").open()) if r.get("val/mlm_accuracy")]
        assert rows[-1]["step"] == "7999" and f"{float(rows[-1]['val/mlm_accuracy']):.3f} |" in table
    tables = table.split("\n\n")[1:]
    assert [t.splitlines()[0].split(", from |")[0] for t in tables] == [
        "| ChnSentiCorp dev, fine-tuned on 2,000 reviews for 5 epochs at lr 0.0003",
        "| ChnSentiCorp dev, fine-tuned on 2,000 reviews for 5 epochs at lr 0.0001",
        "| ChnSentiCorp dev, fine-tuned on 2,000 reviews for 5 epochs, mean pooling at lr 0.0003",
        "| ChnSentiCorp dev, fine-tuned on 500 reviews for 5 epochs at lr 0.0003"]
    assert "| random weights | 0.800 / 0.820 / 0.840 | 0.820 ± 0.020 | |" in tables[0]
    # the same encoder and settings in two studies (random weights rerun in the second): rows named by folder
    rows = tables[0].splitlines()
    plain = rows.index("| novels, whole words, then the reviews' text (`wwm-tapt`) | 0.850 / 0.860 / 0.900 | "
                       "0.870 ± 0.026 | +5.0 |")
    assert rows[plain + 1:plain + 3] == [
        "| random weights (beside the next row) | 0.820 / 0.840 / 0.860 | 0.840 ± 0.020 | |",
        "| novels, whole words, then the reviews' text (`wwm-tapt-rerun`) | 0.850 / 0.860 / 0.900 | 0.870 ± 0.026 | +3.0 |"]
    # the same encoder with its pooler re-initialised: its own row, after the plain ones, against the same random runs
    assert rows[plain + 3] == ("| novels, whole words, then the reviews' text, pooler re-initialised | "
                               "0.860 / 0.870 / 0.910 | 0.880 ± 0.026 | +6.0 |")
    assert "| random weights | 0.750 / 0.770 / 0.790 | 0.770 ± 0.020 | |" in tables[1]  # only the lr 1e-4 study's
    assert "| novels, characters, then the reviews' text | 0.850 / 0.860 / 0.900 | 0.870 ± 0.026 | +10.0 |" in tables[1]
    assert "| random weights | 0.830 / 0.850 / 0.870 | 0.850 ± 0.020 | |" in tables[2]
    assert "| novels, characters, then the reviews' text | 0.850 / 0.860 / 0.900 | 0.870 ± 0.026 | +2.0 |" in tables[2]
    assert "| random weights | 0.700 / 0.720 / 0.740 | 0.720 ± 0.020 | |" in tables[3]
    assert "| novels, characters | 0.750 / 0.760 / 0.800 | 0.770 ± 0.026 | +5.0 |" in tables[3]
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
