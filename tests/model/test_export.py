import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE

from bertpre import load_pretrained
from bertpre.cli import main
from bertpre.errors import UserError
from bertpre.model.bert import BertForPretraining
from bertpre.model.export import export_checkpoint, import_hf

transformers = pytest.importorskip("transformers")
TINY = str(ROOT / "configs" / "bert-tiny.yaml")


@pytest.fixture(scope="module")
def checkpoint(sample_prepared, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export-run")
    main(["train", "--config", TINY, "--data.path", str(sample_prepared), "--trainer.default_root_dir", str(run),
          "--trainer.max_steps", "20", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
          "--model.vocab_multiple_of", "64"])
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("exported") / "hf")


def padded_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 24), generator=g)
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    mask[3, 7:] = 0
    ids[mask == 0] = 0
    return ids, types, mask


@pytest.mark.parametrize("train_mode", [False, True])
def test_transformers_gives_the_same_logits(checkpoint, exported, train_mode):
    ours, _ = load_pretrained(checkpoint)
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if train_mode else {}
    theirs = transformers.BertForPreTraining.from_pretrained(str(exported), **overrides)
    if train_mode:  # dropout draws differ between implementations: compare with dropout off
        ours = BertForPretraining(replace(ours.config, hidden_dropout=0.0, attention_dropout=0.0)).eval()
        ours.load_state_dict(load_pretrained(checkpoint)[0].state_dict())
    ours.train(train_mode)
    theirs.train(train_mode)
    ids, types, mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        mlm, nsp = ours(ids, types, mask)
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    assert (mlm - out.prediction_logits).abs().max() <= 1e-5  # every position, padding included
    assert (nsp - out.seq_relationship_logits).abs().max() <= 1e-5


def test_exported_config_and_files(exported, checkpoint):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-12
    assert config["pad_token_id"] == 0 and config["vocab_size"] == 2048  # 2000 tokens padded to 64
    assert config["max_position_embeddings"] == 512 and config["type_vocab_size"] == 2
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["do_lower_case"] is True and tokenizer_config["model_max_length"] == 512
    for name in ("model.safetensors", "tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        assert (exported / name).is_file()


def test_autotokenizer_gives_bertpre_ids_on_the_sample(exported, checkpoint):
    _, ours = load_pretrained(checkpoint)
    theirs = transformers.AutoTokenizer.from_pretrained(str(exported))
    lines = [line.strip() for line in (SAMPLE / "carroll-alice.txt").read_text().splitlines() if line.strip()][:400]
    for a, b in zip(lines[::2], lines[1::2]):
        assert theirs(a, b)["input_ids"] == ours.encode(a, b).ids
        assert theirs(a)["input_ids"] == ours.encode(a).ids


def test_other_transformers_classes_and_fill_mask_load_it(exported):
    encoder = transformers.BertModel.from_pretrained(str(exported))
    classifier = transformers.BertForSequenceClassification.from_pretrained(str(exported), num_labels=2)
    assert encoder.config.hidden_size == 128 and classifier.config.num_labels == 2
    fill = transformers.pipeline("fill-mask", model=str(exported), tokenizer=str(exported))
    predictions = fill("alice was beginning to get very [MASK] of sitting by her sister")
    assert len(predictions) == 5 and all("token_str" in p for p in predictions)


def test_export_import_export_is_bit_identical(exported, tmp_path):
    imported = tmp_path / "imported.ckpt"
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert import_hf(exported, imported) == []
    assert torch.equal(torch.rand(3), expected), "importing reset the caller's random state"
    again = export_checkpoint(imported, tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name


def test_a_masked_lm_imports_and_loads_without_a_sentence_head(exported, tmp_path):
    """A BertForMaskedLM directory (what `--objective none` exports, RoBERTa-style MLM-only
    pretraining) has no pooler or sentence head: imported or loaded, the model has none either, and
    nothing is initialised at random (the head a later NSP run needs comes with model.init_from)."""
    masked_lm = transformers.BertForMaskedLM.from_pretrained(str(exported))
    source = tmp_path / "mlm"
    masked_lm.save_pretrained(str(source))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (source / name).write_bytes((exported / name).read_bytes())
    initialised = import_hf(source, tmp_path / "from-mlm.ckpt")
    assert initialised == []
    reference, _ = load_pretrained(exported)
    for model, _ in (load_pretrained(tmp_path / "from-mlm.ckpt"), load_pretrained(source)):
        assert model.nsp is None and model.pooler is None and model.config.sentence_head is False
        torch.testing.assert_close(model.embeddings.word.weight, reference.embeddings.word.weight)


def test_load_pretrained_replaces_the_dropout_rates_of_a_checkpoint_and_of_a_directory(checkpoint, exported):
    """For fine-tuning: the rates change, the weights and the outputs in eval mode do not."""
    for source in (checkpoint, exported):
        plain, _ = load_pretrained(source)
        changed, _ = load_pretrained(source, {"hidden_dropout": 0.3})
        assert plain.config.hidden_dropout == 0.0 and changed.config.hidden_dropout == 0.3, source
        assert changed.config.attention_dropout == plain.config.attention_dropout == 0.0, source
        assert {m.p for m in changed.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}, source
        assert all(torch.equal(a, changed.state_dict()[k]) for k, a in plain.state_dict().items()), source


def test_load_pretrained_with_a_task_head(checkpoint):
    # The README's example, as it is there.
    model, tokenizer = load_pretrained(checkpoint)
    head = torch.nn.Linear(model.config.hidden_size, 3)
    enc = tokenizer.encode_batch(["a first sentence.", "and a second, longer sentence here."])
    width = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in enc])
    mask = torch.tensor([e.attention_mask + [0] * (width - len(e.ids)) for e in enc])
    hidden = model.encode(ids, torch.zeros_like(ids), mask)  # (B, T, H)
    logits = head(model.pool(hidden))  # (B, 3)
    assert logits.shape == (2, 3)


def test_not_a_checkpoint_and_other_architectures_are_refused(tmp_path, exported):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        export_checkpoint(junk, tmp_path / "out")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.encoder.weight": torch.zeros(2)}, "bertpre": {
        "model_config": {"vocab_size": 10, "hidden_size": 8, "num_layers": 1, "num_heads": 2,
                         "intermediate_size": 16}, "tokenizer": "{}"}}, other)
    with pytest.raises(UserError, match="weights do not fit a bertpre BERT"):
        load_pretrained(other)
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(UserError, match="model_type is 'roberta'"):
        import_hf(roberta, tmp_path / "r.ckpt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.ckpt").exists()


@pytest.mark.slow
def test_a_pre_ln_model_exports_to_roberta_prelayernorm_and_is_read_by_everything(sample_prepared, tmp_path):
    """transformers has no pre-LN BERT; its RoBERTa-PreLayerNorm classes compute the same thing once
    positions are shifted past the padding id. Pretraining and fine-tuned checkpoints both export."""
    from bertpre.model.checkpoint import load_classifier

    run = tmp_path / "run"
    main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
          "--trainer.default_root_dir", str(run), "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false", "--model.config.norm_placement", "pre"])
    ckpt = run / "checkpoints" / "last.ckpt"
    main(["export", str(ckpt), "--output", str(tmp_path / "hf")])
    ours, _ = load_pretrained(ckpt)
    assert ours.config.norm_placement == "pre" and ours.final_norm is not None
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(theirs).__name__ == "RobertaPreLayerNormForMaskedLM"
    ids, types, mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        mlm, _ = ours.eval()(ids, types, mask)
        logits = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    real = mask.bool()  # a padded position gets RoBERTa's padding position id there: not compared
    assert (mlm[real] - logits[real]).abs().max() <= 1e-5

    rows = "sentence\tlabel\n" + "".join(f"{w} film\t{i % 2}\n" for i, w in enumerate(["a fine", "a dull"] * 8))
    (tmp_path / "t.tsv").write_text(rows)
    main(["finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained", str(ckpt),
          "--data.train_file", str(tmp_path / "t.tsv"), "--data.validation_file", str(tmp_path / "t.tsv"),
          "--data.batch_size", "4", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "ft"),
          "--trainer.enable_progress_bar", "false"])
    finetuned = tmp_path / "ft" / "checkpoints" / "last.ckpt"
    main(["predict", "--checkpoint", str(finetuned), "--input", str(tmp_path / "t.tsv"), "--output",
          str(tmp_path / "p.tsv")])
    assert len((tmp_path / "p.tsv").read_text().splitlines()) == 17
    main(["export", str(finetuned), "--output", str(tmp_path / "hf-cls")])
    classifier, _, _ = load_classifier(finetuned)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf-cls")).eval()
    assert type(theirs).__name__ == "RobertaPreLayerNormForSequenceClassification"
    with torch.no_grad():
        difference = classifier(ids, types, mask) - theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    assert difference.abs().max() <= 1e-5


def test_a_fine_tuned_classifier_exports_to_transformers_with_its_labels(finetuned_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    from bertpre.model.checkpoint import load_classifier

    out = tmp_path / "classifier"
    main(["export", str(finetuned_checkpoint), "--output", str(out)])
    ours, tokenizer, task = load_classifier(finetuned_checkpoint)
    peer = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert peer.config.id2label == {0: "0", 1: "1"} and peer.config.label2id == {"0": 0, "1": 1}
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate"]
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[: len(tokenizer.encode(texts[0]).ids)] == tokenizer.encode(texts[0]).ids
    with torch.no_grad():
        theirs = peer(**batch).logits
        mine = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert torch.allclose(theirs, mine, atol=1e-5), (theirs, mine)
    classify = transformers.pipeline("text-classification", model=str(out), tokenizer=str(out), top_k=None)
    scores = {d["label"]: d["score"] for d in classify(texts[:1])[0]}
    assert set(scores) == {"0", "1"} and abs(scores["1"] - mine.softmax(-1)[0, 1].item()) < 1e-5


def test_loading_a_checkpoint_never_imports_lightning(finetuned_checkpoint, sample_checkpoint):
    """What loads a model for inference or export stands without the trainer's stack."""
    import subprocess
    import sys

    code = ("import sys, bertpre\n"
            f"model, tokenizer = bertpre.load_pretrained({str(sample_checkpoint)!r})\n"
            "from bertpre.model.checkpoint import load_classifier\n"
            f"classifier, _, task = load_classifier({str(finetuned_checkpoint)!r})\n"
            "import bertpre.model.export\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')], "
            "sorted(m for m in sys.modules if 'lightning' in m)[:5]\n"
            "print(task['labels'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip() == "['0', '1']"
