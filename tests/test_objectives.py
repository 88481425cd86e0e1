"""The sentence objectives (`bertpre prepare --objective nsp|sop|none`) from the data to the
HuggingFace export: NSP's output unchanged, SOP's pairs adjacent and balanced, none's sequences
full and of one segment, training and export following the data."""

import hashlib
import json
import math
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE

from bertpre.cli import main
from bertpre.data.pairs import PairOptions, create_instances
from bertpre.data.prepare import PrepareOptions, prepare
from bertpre.data.prepared import PreparedData, combine
from bertpre.data.tokenizer import SentenceEncoder, load_tokenizer
from bertpre.errors import UserError

BOOKS = [str(SAMPLE), str(ROOT / "data_prep" / "books")]  # the quickstart's 15 books, bundled
TINY = str(ROOT / "configs" / "bert-tiny.yaml")
# content digests of the sample prepared as below at the commit before the objectives existed: nsp's
# data must stay exactly what it was (input ids, token types, labels, static masks)
NSP_DIGESTS = {False: "5601b78b78396ba4fc77387e8868c9abab338fcbe735672a794ac361521af69b",
               True: "1ccaa9ab1ae1eb398fb8a52b7d3c97f88442964cf0f9318d3e23b33174837c3d"}


def content_digest(path) -> str:
    """Every column's values and row boundaries, independent of how Arrow lays out its files."""
    splits = PreparedData(path).load_dataset()
    h = hashlib.sha256()
    for split in ("train", "validation"):
        table = splits[split].data
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if str(column.type).startswith("list"):
                h.update(np.asarray(column.offsets).astype(np.int64).tobytes())
                column = column.flatten()
            h.update(name.encode())
            h.update(np.asarray(column).astype(np.int64).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-wwm"])
def test_nsp_data_is_what_it_was_before_the_objectives(static, tmp_path):
    out = tmp_path / "nsp"
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=out, vocab_size=2000, num_proc=1, static_masking=static,
                           whole_word_masking=static, pairs=PairOptions(max_seq_length=64)))
    assert content_digest(out) == NSP_DIGESTS[static]
    assert json.loads((out / "prepare.json").read_text())["options"]["pairs"]["objective"] == "nsp"


@pytest.fixture(scope="module")
def book_documents(prepared_objectives):
    """The 15 bundled books as token-id documents (the tokenizer prepare trained on them)."""
    from bertpre.data.corpus import CorpusOptions, CorpusStats, expand_inputs, read_documents

    encoder = SentenceEncoder(load_tokenizer(prepared_objectives / "sop"))
    documents = []
    for document in read_documents(expand_inputs(BOOKS), CorpusOptions(), CorpusStats()):
        ids, counts = encoder.encode(document)
        sentences = [s for s in np.split(ids, np.cumsum(counts)[:-1]) if len(s)]
        documents.append(sentences)
    return documents


def test_sop_pairs_are_two_adjacent_spans_of_one_document_in_or_out_of_order(book_documents):
    """Long enough pairs that nothing is cut: A then B (or B then A when swapped) must be a run of
    whole sentences of one document, A ending where B begins."""
    streams = [np.concatenate(d) for d in book_documents]
    starts = [set(np.cumsum([0] + [len(s) for s in d]).tolist()) for d in book_documents]
    # every sentence start of every document, by the three tokens from there: where a pair can begin
    begins = defaultdict(list)
    for d, stream in enumerate(streams):
        for at in starts[d]:
            begins[tuple(stream[at:at + 3].tolist())].append((d, at))
    # every target short (uniform up to the maximum): chunks rarely pass the maximum and get cut
    instances = list(create_instances(book_documents, PairOptions(max_seq_length=1024, objective="sop",
                                                                  short_seq_prob=1.0), random.Random(1)))
    whole = [inst for inst in instances if inst.truncated == 0]  # a cut pair lost tokens at its ends
    assert len(whole) > 2000 and len(whole) > 0.8 * len(instances)
    for inst in whole:
        first, second = (inst.tokens_b, inst.tokens_a) if inst.is_random_next else (inst.tokens_a, inst.tokens_b)
        assert len(first) and len(second)
        joined = np.concatenate([first, second])
        candidates = begins.get(tuple(joined[:3].tolist()), []) if len(joined) >= 3 else \
            [(d, at) for d in range(len(streams)) for at in starts[d]]
        assert any(np.array_equal(streams[d][at:at + len(joined)], joined) and at + len(first) in starts[d]
                   for d, at in candidates), "a SOP pair is not two adjacent runs of whole sentences of one document"


def test_sop_labels_are_balanced_on_real_text(book_documents):
    instances = list(create_instances(book_documents, PairOptions(max_seq_length=128, objective="sop"),
                                      random.Random(7)))
    n, swapped = len(instances), sum(inst.is_random_next for inst in instances)
    assert n > 15_000
    assert abs(swapped - n / 2) < 4 * math.sqrt(n / 4), f"{swapped} of {n} swapped: not a fair coin"
    # the cut says nothing about the label: among pairs cut down to (almost) equal halves, the first
    # segment is the longer one as often in order as swapped (Google's cut, which takes the odd token
    # from B, made the lengths a 67% cue at seq 64)
    cut = [i for i in instances if i.truncated and abs(len(i.tokens_a) - len(i.tokens_b)) <= 1]
    longer_first = {flag: [len(i.tokens_a) > len(i.tokens_b) for i in cut if i.is_random_next == flag]
                    for flag in (False, True)}
    p = [np.mean(longer_first[flag]) for flag in (False, True)]
    sigma = math.sqrt(sum(q * (1 - q) / len(longer_first[f]) for q, f in zip(p, (False, True))))
    assert len(cut) > 3000 and abs(p[0] - p[1]) < 4 * sigma, p
    # what stays is the chunk's last sentence, which crosses the target length and so tends to be long:
    # "swapped when A is the longer" is right on 54-56% of pairs (docs/data.md)
    rule = np.mean([(len(i.tokens_a) > len(i.tokens_b)) == i.is_random_next for i in instances])
    assert 0.5 <= rule < 0.6


@pytest.fixture(scope="module")
def prepared_objectives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("objectives")
    prepare(PrepareOptions(inputs=BOOKS, output=folder / "sop", vocab_size=4000, tokenizer_sample_mb=1.0,
                           pairs=PairOptions(max_seq_length=64, objective="sop")))
    # none on the sample's 4 books (what its tests check holds on any real text), with the same tokenizer
    prepare(PrepareOptions(inputs=[str(SAMPLE)], output=folder / "none", tokenizer=str(folder / "sop"),
                           pairs=PairOptions(max_seq_length=64, objective="none")))
    return folder


def test_none_fills_its_sequences_with_one_segment_and_no_label(prepared_objectives):
    prepared = PreparedData(prepared_objectives / "none")
    train = prepared.load_dataset()["train"]
    assert "next_sentence_label" not in train.column_names
    lengths = np.array([len(ids) for ids in train["input_ids"]])
    assert lengths.mean() >= 0.9 * 64 and lengths.max() == 64
    assert all(not any(types) for types in train["token_type_ids"])
    sep = prepared.tokenizer.token_to_id("[SEP]")
    documents_joined = sum(int(np.count_nonzero(np.asarray(ids[1:-1]) == sep)) for ids in train["input_ids"])
    assert documents_joined >= 1, "no sequence continues into the next document after a [SEP]"
    assert prepared.record.options["pairs"]["short_seq_prob"] == 0.0  # full sequences unless asked


def test_the_objective_is_recorded_and_summarised(prepared_objectives, capsys):
    from bertpre.data.summary import summary

    for objective, words in (("sop", "swapped"), ("none", "fill")):
        record = PreparedData(prepared_objectives / objective).record
        assert record.objective == objective
        text = summary(record, prepared_objectives / objective)
        assert f"objective {objective}" in text and words in text and "NotNext" not in text


def test_sop_on_one_sentence_documents_is_refused_in_one_line(tmp_path):
    corpus = tmp_path / "lines.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Sentence number {i} stands alone."}) + "\n" for i in range(200)))
    with pytest.raises(UserError, match="--objective sop: no training pairs, every training document has a single"):
        prepare(PrepareOptions(inputs=[str(corpus)], output=tmp_path / "out", vocab_size=200,
                               pairs=PairOptions(objective="sop")))
    assert not (tmp_path / "out").exists()


def test_an_unknown_objective_gets_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="--objective must be one of nsp, sop, none, got 'mlm'"):
        PairOptions(objective="mlm")
    with pytest.raises(SystemExit) as exited:
        main(["prepare", "--input", str(SAMPLE), "--output", str(tmp_path / "o"), "--objective", "mlm"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--objective" in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "o").exists()


def test_combine_refuses_shards_of_different_objectives(prepared_objectives, tmp_path):
    with pytest.raises(UserError, match="objective differs"):
        combine([str(prepared_objectives / "sop"), str(prepared_objectives / "none")], tmp_path / "both")


def train(data, run, *extra):
    main(["train", "--config", TINY, "--data.path", str(data), "--trainer.default_root_dir", str(run),
          "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
          "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1", *extra])
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained(prepared_objectives, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return {objective: train(prepared_objectives / objective, runs / objective) for objective in ("sop", "none")}


def test_training_follows_the_data_sop_logs_sop_none_has_no_sentence_head(trained):
    import csv

    from bertpre.model.checkpoint import load_pretrained

    for objective, checkpoint in trained.items():
        columns = next(csv.reader((checkpoint.parents[1] / "logs" / "version_0" / "metrics.csv").open()))
        sentence = {c for c in columns if c.split("/")[-1].startswith(("nsp_", "sop_"))}
        if objective == "sop":
            assert sentence == {"train/sop_loss", "train/sop_accuracy", "val/sop_loss", "val/sop_accuracy"}
        else:
            assert not sentence
        model, _ = load_pretrained(checkpoint)
        has_head = objective == "sop"
        assert (model.nsp is not None, model.pooler is not None, model.config.sentence_head) == (has_head,) * 3


def test_a_config_asking_for_a_head_the_data_lacks_is_refused(prepared_objectives, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--config", TINY, "--data.path", str(prepared_objectives / "none"), "--trainer.default_root_dir",
              str(tmp_path / "run"), "--model.config.sentence_head", "true", "--trainer.max_steps", "2"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "model.config.sentence_head is true but" in err and "--objective none" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("objective, architecture", [("sop", "BertForPreTraining"), ("none", "BertForMaskedLM")])
def test_export_gives_the_objective_s_transformers_class_with_equal_logits(trained, objective, architecture,
                                                                          tmp_path):
    transformers = pytest.importorskip("transformers")
    from bertpre.model.checkpoint import load_pretrained
    from bertpre.model.export import export_checkpoint

    out = export_checkpoint(trained[objective], tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    peer = getattr(transformers, architecture).from_pretrained(out).eval()
    ours, tokenizer = load_pretrained(trained[objective])
    ids = torch.randint(5, tokenizer.get_vocab_size(), (3, 24), generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(ids)
    with torch.no_grad():
        mlm, sentence = ours(ids, types, torch.ones_like(ids))
        theirs = peer(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids))
    if objective == "sop":
        assert torch.allclose(mlm, theirs.prediction_logits, atol=1e-5)
        assert torch.allclose(sentence, theirs.seq_relationship_logits, atol=1e-5)
    else:
        assert sentence is None and torch.allclose(mlm, theirs.logits, atol=1e-5)
        fill = transformers.pipeline("fill-mask", model=str(out))
        assert len(fill("the king spoke to the [MASK] .")) == 5


def test_an_mlm_only_model_fine_tunes_with_a_new_pooler_and_imports_back_without_a_head(trained, tmp_path):
    from bertpre.model.bert import BertForSequenceClassification
    from bertpre.model.checkpoint import load_pretrained
    from bertpre.model.export import export_checkpoint, import_hf

    encoder, _ = load_pretrained(trained["none"])
    classifier = BertForSequenceClassification(encoder, num_labels=2)
    assert classifier.encoder.pooler is not None
    logits = classifier(torch.tensor([[2, 10, 11, 3]]), torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 2)
    hf = export_checkpoint(trained["none"], tmp_path / "hf")
    import_hf(hf, tmp_path / "back.ckpt")
    back, _ = load_pretrained(tmp_path / "back.ckpt")
    assert back.nsp is None and back.pooler is None


def test_a_checkpoint_with_a_sentence_head_starts_an_mlm_only_run_which_resumes(trained, prepared_objectives, tmp_path, capsys):
    """init_from carries the encoder and MLM head across objectives (the sentence head is left
    behind); the MLM-only run then resumes from its own checkpoint."""
    run = tmp_path / "none-from-sop"
    last = train(prepared_objectives / "none", run, "--model.init_from", str(trained["sop"]))
    train(prepared_objectives / "none", run, "--ckpt_path", "last", "--trainer.max_steps", "8")
    assert torch.load(last, weights_only=True)["global_step"] == 8
    assert "trained 8 steps" in capsys.readouterr().out


@pytest.mark.slow  # two preparations and two training runs, 9 s here; in CI's slow run
def test_static_masking_and_whole_words_work_for_every_objective(tmp_path):
    for objective in ("sop", "none"):
        out = tmp_path / objective
        prepare(PrepareOptions(inputs=[str(SAMPLE / "carroll-alice.txt"), str(SAMPLE / "shakespeare-caesar.txt")],
                               output=out, vocab_size=1000, static_masking=True, whole_word_masking=True,
                               tokenizer=None if objective == "sop" else str(tmp_path / "sop"),
                               pairs=PairOptions(max_seq_length=64, objective=objective)))
        train_split = PreparedData(out).load_dataset()["train"]
        assert {"masked_lm_positions", "masked_lm_ids"} <= set(train_split.column_names)
        assert ("next_sentence_label" in train_split.column_names) == (objective == "sop")
        assert sum(len(p) for p in train_split["masked_lm_positions"]) > 0
        train(out, tmp_path / f"run-{objective}")


def test_bertpre_finetune_runs_from_an_mlm_only_checkpoint(trained, tmp_path, capsys):
    from conftest import SHARED_DATA

    sst2 = SHARED_DATA / "tasks" / "sst2"
    if not sst2.is_dir():
        pytest.skip("../shared/data is not present")
    run = tmp_path / "finetune"
    main(["finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained",
          str(trained["none"]), "--data.train_file", str(sst2 / "train.tsv"), "--data.validation_file",
          str(sst2 / "dev.tsv"), "--data.max_train_examples", "64", "--data.batch_size", "16",
          "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(run),
          "--trainer.enable_progress_bar", "false"])
    assert "trained 4 steps" in capsys.readouterr().out and (run / "checkpoints" / "last.ckpt").is_file()
