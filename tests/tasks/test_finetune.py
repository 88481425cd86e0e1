import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_DATA, gradient_poison

from bertpre.cli import main
from bertpre.data.tokenizer import load_tokenizer
from bertpre.errors import UserError
from bertpre.tasks.classifier import ClassifierModule, layer_lr_scales
from bertpre.tasks.table import encode_rows, read_table, sample_rows
from bertpre.training.optim import parameter_groups

TINY = str(ROOT / "configs" / "bert-tiny.yaml")
SST2 = SHARED_DATA / "tasks" / "sst2"


@pytest.fixture(scope="module")
def pretrained(sample_checkpoint) -> Path:
    return sample_checkpoint


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory) -> Path:
    if not SST2.is_dir():
        pytest.skip("../shared/data is not present")
    out = tmp_path_factory.mktemp("sst2")
    (out / "train.tsv").write_text("".join((SST2 / "train.tsv").read_text().splitlines(True)[:641]))
    (out / "dev.tsv").write_text("".join((SST2 / "dev.tsv").read_text().splitlines(True)[:201]))
    return out


def test_finetune_then_predict_on_glue_files_as_they_are(pretrained, sst2_slice, tmp_path, capsys):
    run = tmp_path / "run"
    main(["finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained", str(pretrained),
          "--data.train_file", str(sst2_slice / "train.tsv"), "--data.validation_file", str(sst2_slice / "dev.tsv"),
          "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar",
          "false", "--trainer.log_every_n_steps", "5"])
    out = capsys.readouterr().out
    assert "trained 40 steps" in out and "val/accuracy" in out and "val/matthews" in out and "val/f1" in out
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (run / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    accuracies = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)

    # resuming is the same run: a changed model option is refused by name, not silently taken or dropped
    command = ["finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained",
               str(pretrained), "--data.train_file", str(sst2_slice / "train.tsv"), "--data.validation_file",
               str(sst2_slice / "dev.tsv"), "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "3",
               "--trainer.enable_progress_bar", "false", "--ckpt_path"]
    for where in ("last", str(run / "checkpoints" / "last.ckpt")):
        with pytest.raises(SystemExit):
            main([*command, where, "--model.pooling", "mean"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.endswith("ckpt_path: the run it saved differs from this one in pooling; resume with the options "
                            "that run was started with, or start a new run"), err

    predictions = tmp_path / "pred.tsv"
    main(["predict", "--checkpoint", str(best[0]), "--input", str(sst2_slice / "dev.tsv"), "--output", str(predictions)])
    written = list(csv.DictReader(predictions.open(), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(written) == 200 and {r["prediction"] for r in written} <= {"0", "1"}
    assert written[0]["content"] == "one long string of cliches ."


def test_random_init_keeps_architecture_and_tokenizer_but_not_weights(pretrained):
    trained = ClassifierModule(str(pretrained))
    scratch = ClassifierModule(str(pretrained), random_init=True)
    columns = {"text_column": "sentence", "text_pair_column": None, "label_column": "label", "max_seq_length": 64}
    for module in (trained, scratch):
        module.use_labels(["neg", "pos"], columns)
    assert trained.model.config == scratch.model.config
    assert trained.tokenizer.to_str() == scratch.tokenizer.to_str()
    assert not torch.equal(trained.model.encoder.layers[0].query.weight, scratch.model.encoder.layers[0].query.weight)
    assert all(p.requires_grad for p in trained.parameters())
    assert trained.model.encoder.nsp is None and trained.model.encoder.mlm_bias is None, "pretraining heads dropped"
    assert trained.model.classifier.out_features == 2



def test_random_init_runs_follow_their_seed_beyond_the_fixed_encoder(pretrained):
    """The random-weight baseline's encoder is the same for every seed (BERT's initialisation from
    one fixed seed), but drawing it must not reset the run's random stream: the classifier head (and
    after it dropout and data order) differ from seed to seed, as in a run from a checkpoint."""
    columns = {"text_column": "sentence", "text_pair_column": None, "label_column": "label", "max_seq_length": 64}
    built = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        module = ClassifierModule(str(pretrained), random_init=True)
        module.use_labels(["neg", "pos"], columns)
        built[seed] = (module.model.state_dict(), torch.rand(4))
    (first, after_first), (second, after_second) = built[1], built[2]
    encoder = [k for k in first if k.startswith("encoder.")]
    assert encoder and all(torch.equal(first[k], second[k]) for k in encoder), "the encoder's seed is fixed"
    assert not torch.equal(first["classifier.weight"], second["classifier.weight"]), "the head follows the seed"
    assert not torch.equal(after_first, after_second), "the run's stream after building follows the seed"


def test_reinit_pooler_redraws_the_pooler_alone_and_leaves_the_runs_random_stream(pretrained):
    """The pooler starts from BERT's initialisation (std initializer_range, zero bias); every other
    weight is the checkpoint's; the classifier head drawn afterwards is the same as without it."""
    columns = {"text_column": "sentence", "text_pair_column": None, "label_column": "label", "max_seq_length": 64}
    built = {}
    for reinit in (False, True):
        torch.manual_seed(7)
        module = ClassifierModule(str(pretrained), reinit_pooler=reinit)
        module.use_labels(["neg", "pos"], columns)
        built[reinit] = module.model.state_dict()
    std = module.model.config.initializer_range
    kept, redrawn = built[False], built[True]
    pooler = {"encoder.pooler.weight", "encoder.pooler.bias"}
    assert pooler <= set(kept) and set(kept) == set(redrawn)
    assert all(torch.equal(kept[k], redrawn[k]) for k in kept if k not in pooler)  # classifier head included
    assert not torch.equal(kept["encoder.pooler.weight"], redrawn["encoder.pooler.weight"])
    assert abs(redrawn["encoder.pooler.weight"].std().item() - std) < 0.1 * std
    assert torch.count_nonzero(redrawn["encoder.pooler.bias"]) == 0

def test_reinit_layers_redraws_the_top_layers_alone(pretrained):
    """The top N encoder layers start from BERT's initialisation, the layers below, embeddings and
    pooler are the checkpoint's, and the classifier head is drawn as without the option."""
    columns = {"text_column": "sentence", "text_pair_column": None, "label_column": "label", "max_seq_length": 64}
    built = {}
    for count in (0, 1):
        torch.manual_seed(7)
        module = ClassifierModule(str(pretrained), reinit_layers=count)
        module.use_labels(["neg", "pos"], columns)
        built[count] = module.model.state_dict()
    top = f"encoder.layers.{module.model.config.num_layers - 1}."
    std = module.model.config.initializer_range
    assert all(torch.equal(built[0][k], built[1][k]) == (not k.startswith(top)) for k in built[0]), \
        "the top layer's tensors, and only they, differ"
    assert abs(built[1][top + "query.weight"].std().item() - std) < 0.1 * std
    assert torch.count_nonzero(built[1][top + "ffn_in.bias"]) == 0
    assert torch.equal(built[1][top + "ffn_norm.weight"], torch.ones_like(built[1][top + "ffn_norm.weight"]))
    with pytest.raises(UserError, match="model.reinit_layers must be between 0 and the encoder's 2 layers, got 3"):
        ClassifierModule(str(pretrained), reinit_layers=3)


def test_layer_lr_decay_lowers_the_rate_layer_by_layer(pretrained, sst2_slice, tmp_path):
    """With decay d and L layers: classifier at the learning rate, layer i at d^(L-i) of it, the
    embeddings at d^(L+1) (each group's peak rate, read off the optimizer after a short run; the
    schedule scales every group alike: tests/training/test_optim.py)."""
    import lightning as L

    from bertpre.lightning_cli import connect
    from bertpre.tasks.datamodule import TaskDataModule

    module = ClassifierModule(str(pretrained), learning_rate=1e-3, layer_lr_decay=0.5, warmup_fraction=0.0)
    data = TaskDataModule(str(sst2_slice / "train.tsv"), str(sst2_slice / "dev.tsv"),
                          text_column=["sentence", "content"], batch_size=64)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)
    connect(module, data)
    trainer.fit(module, data)
    rate = {id(p): group["initial_lr"] for group in trainer.optimizers[0].param_groups for p in group["params"]}
    model, top = module.model, module.model.config.num_layers - 1
    head = rate[id(model.classifier.weight)]
    assert head == 1e-3 and rate[id(model.encoder.pooler.weight)] == head
    assert rate[id(model.encoder.layers[top].query.weight)] == pytest.approx(head * 0.5)
    assert rate[id(model.encoder.layers[0].ffn_out.bias)] == pytest.approx(head * 0.5 ** (top + 1))
    assert rate[id(model.embeddings.word.weight)] == pytest.approx(head * 0.5 ** (top + 2))
    plain = [[id(p) for p in g["params"]] for g in parameter_groups(model, 0.01)]
    undecayed = [[id(p) for p in g["params"]] for g in parameter_groups(model, 0.01, layer_lr_scales(model, 1.0))]
    assert undecayed == plain, "decay 1: BERT's two groups, parameters in the same order"
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match=f"model.layer_lr_decay must be in \\(0, 1\\], got {bad}"):
            ClassifierModule(str(pretrained), layer_lr_decay=bad)


def test_fine_tuning_dropout_is_berts_unless_kept_from_the_encoder(pretrained, finetuned_checkpoint):
    """The sample encoder was pretrained without dropout (bert-tiny.yaml). Fine-tuning applies BERT's
    0.1 in every dropout of the encoder by default (random init too), with the checkpoint's weights;
    null keeps the encoder's 0; the task record holds the rate trained with."""
    from bertpre.model.checkpoint import load_classifier, load_pretrained

    encoder, _ = load_pretrained(pretrained)
    assert encoder.config.hidden_dropout == 0.0 == encoder.config.attention_dropout
    columns = {"text_column": "sentence", "text_pair_column": None, "label_column": "label", "max_seq_length": 64}
    built = {}
    for name, options in (("default", {}), ("kept", {"hidden_dropout": None, "attention_dropout": None}),
                          ("random", {"random_init": True}), ("mixed", {"attention_dropout": 0.3})):
        torch.manual_seed(7)  # the classification layer is drawn alike
        module = ClassifierModule(str(pretrained), classifier_dropout=0.0, **options)
        module.use_labels(["neg", "pos"], columns)
        built[name] = module.model
    for name, hidden, attention in (("default", 0.1, 0.1), ("kept", 0.0, 0.0), ("random", 0.1, 0.1),
                                    ("mixed", 0.1, 0.3)):
        model = built[name]
        assert (model.config.hidden_dropout, model.config.attention_dropout) == (hidden, attention), name
        assert {m.p for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)} == {hidden}, name
        assert {layer.attention_dropout for layer in model.encoder.layers} == {attention}, name
    default, kept = built["default"], built["kept"]
    assert default.state_dict().keys() == kept.state_dict().keys()
    assert all(torch.equal(a, kept.state_dict()[k]) for k, a in default.state_dict().items())

    ids = torch.randint(5, default.config.vocab_size, (4, 16))
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    for model in (default, kept):
        model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(default(ids, types, mask), default(ids, types, mask)), "dropout is active"
        assert torch.equal(kept(ids, types, mask), kept(ids, types, mask)), "no dropout when kept at 0"
        assert torch.equal(default.eval()(ids, types, mask), kept.eval()(ids, types, mask)), "same weights"

    for option, rate in (("hidden_dropout", 1.0), ("attention_dropout", -0.1), ("classifier_dropout", 1.5)):
        with pytest.raises(UserError, match=rf"model.{option} must be in \[0, 1\)"):
            ClassifierModule(str(pretrained), **{option: rate})
    _, _, task = load_classifier(finetuned_checkpoint)
    assert task["model_config"]["hidden_dropout"] == 0.1 == task["model_config"]["attention_dropout"]


def test_mean_pooling_fine_tunes_predicts_and_is_refused_by_export(pretrained, sst2_slice, tmp_path, capsys):
    from bertpre.model.checkpoint import load_classifier

    run = tmp_path / "run"
    main(["finetune", "--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained", str(pretrained),
          "--model.pooling", "mean", "--data.train_file", str(sst2_slice / "train.tsv"), "--data.validation_file",
          str(sst2_slice / "dev.tsv"), "--data.max_train_examples", "160", "--data.batch_size", "16",
          "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(run),
          "--trainer.enable_progress_bar", "false"])
    checkpoint = run / "checkpoints" / "last.ckpt"
    classifier, _, task = load_classifier(checkpoint)
    assert task["pooling"] == "mean" and classifier.pooling == "mean" and classifier.encoder.pooler is None
    predictions = tmp_path / "pred.tsv"
    main(["predict", "--checkpoint", str(checkpoint), "--input", str(sst2_slice / "dev.tsv"), "--output", str(predictions)])
    assert len(predictions.read_text().splitlines()) == 201
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["export", str(checkpoint), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert "model.pooling mean" in err and "bertpre predict" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="model.reinit_pooler needs model.pooling cls"):
        ClassifierModule(str(pretrained), reinit_pooler=True, pooling="mean")
    with pytest.raises(UserError, match="model.pooling must be one of cls, mean"):
        ClassifierModule(str(pretrained), pooling="first")


def test_tables_and_sentence_pairs(tmp_path, sample_prepared):
    (tmp_path / "pairs.csv").write_text('premise,hypothesis,label\n"A man, smiling.",He is happy.,yes\n')
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"premise": "A cat.", "hypothesis": "An animal.",
                                                      "label": "yes"}) + "\n")
    tokenizer = load_tokenizer(sample_prepared)
    columns = {"text_column": "premise", "text_pair_column": "hypothesis", "label_column": "label",
               "max_seq_length": 16}
    for name in ("pairs.csv", "pairs.jsonl"):
        rows = read_table(tmp_path / name)
        [(ids, types, label)] = encode_rows(rows, name, tokenizer, columns, labels=["no", "yes"])
        assert label == 1 and ids[0] == tokenizer.token_to_id("[CLS]")
        assert types[0] == 0 and types[-1] == 1 and ids.count(tokenizer.token_to_id("[SEP]")) == 2
    with pytest.raises(UserError, match=r"pairs.csv: no column 'sentence' .*columns: premise, hypothesis, label"):
        encode_rows(read_table(tmp_path / "pairs.csv"), "pairs.csv", tokenizer, {**columns, "text_column": "sentence"},
                    labels=["yes"])
    with pytest.raises(UserError, match=r"label 'yes' is not one of the training labels"):
        encode_rows(read_table(tmp_path / "pairs.csv"), "pairs.csv", tokenizer, columns, labels=["0", "1"])


def test_predict_refuses_a_pretraining_checkpoint(pretrained, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(pretrained), "--input", "x.tsv", "--output", str(tmp_path / "p.tsv")])
    assert "not a `bertpre finetune` checkpoint" in capsys.readouterr().err


def test_shipped_finetune_config_parses(pretrained, tmp_path):
    from bertpre.lightning_cli import BertpreCLI
    from bertpre.tasks.datamodule import TaskDataModule

    cli = BertpreCLI(ClassifierModule, TaskDataModule, run=False,
                     args=["--config", str(ROOT / "configs" / "finetune-sst2.yaml"), "--model.pretrained",
                           str(pretrained), "--trainer.default_root_dir", str(tmp_path)])
    # the learning rate is left to the encoder's size: the fixture's small encoder gets a small BERT's rate
    assert cli.model.hparams.learning_rate is None and cli.model.hparams.warmup_fraction == 0.1
    assert cli.model.learning_rate == 3e-4
    assert cli.datamodule.text_column == ["sentence", "content"] and 2 <= cli.trainer.max_epochs <= 4
    assert cli.trainer.checkpoint_callback.monitor == "val/accuracy"


def test_training_subset_is_seeded_and_sized(sst2_slice):
    rows = read_table(sst2_slice / "train.tsv")
    first, again, other = (sample_rows(rows, 100, seed) for seed in (0, 0, 1))
    assert len(first) == 100 and first == again and first != other
    assert [rows.index(r) for r in first] == sorted(rows.index(r) for r in first), "file order kept"
    assert sample_rows(rows, 10_000, 0) == rows


def test_a_non_finite_fine_tuning_step_is_skipped(pretrained, sst2_slice, tmp_path, capsys):
    import lightning as L

    from bertpre.lightning_cli import connect
    from bertpre.tasks.datamodule import TaskDataModule

    poison = gradient_poison(3, lambda module: module.model.classifier.weight, float("inf"))
    module = ClassifierModule(str(pretrained), learning_rate=1e-4)
    data = TaskDataModule(str(sst2_slice / "train.tsv"), str(sst2_slice / "dev.tsv"),
                          text_column=["sentence", "content"], batch_size=64)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=0, callbacks=[poison], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)
    connect(module, data)
    trainer.fit(module, data)
    assert "bertpre: step 4: non-finite gradient norm inf; batch skipped (1 in a row)" in capsys.readouterr().out
    assert all(torch.equal(poison.before[k], poison.after[k]) for k in poison.before), "no update at the bad step"
    assert module.nonfinite_guard.skipped == [4] and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.parameters())

    with pytest.raises(UserError, match="model.nonfinite must be 'skip' or 'stop'"):
        ClassifierModule(str(pretrained), nonfinite="ignore")


def test_a_jsonl_null_is_a_missing_text_and_empty_rows_are_warned_about(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text('{"sentence": "a fine film", "label": 1}\n{"sentence": null, "label": 0}\n'
                    '{"sentence": "  ", "label": 1}\n')
    rows = read_table(path)
    assert rows[1]["sentence"] == "" and rows[0]["label"] == "1"
    columns = {"text_column": "sentence", "text_pair_column": None, "label_column": "label", "max_seq_length": 16}
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    encoded = encode_rows(rows, str(path), tokenizer, columns, ["0", "1"])
    assert len(encoded) == 3
    assert capsys.readouterr().err.strip() == (f"bertpre: warning: {path}: 2 of 3 rows have an empty 'sentence' "
                                               "(rows 2, 3); they are kept")


def test_predict_scores_are_probabilities_and_jsonl_is_read(finetuned_checkpoint, tmp_path):
    rows = [{"sentence": "a gorgeous , witty , seductive movie ."}, {"sentence": "the plot is nothing but boilerplate"},
            {"sentence": "it 's a charming and often affecting journey ."}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["predict", "--checkpoint", str(finetuned_checkpoint), "--input", str(tmp_path / "in.jsonl"),
          "--output", str(tmp_path / "scored.tsv"), "--scores"])
    written = list(csv.DictReader((tmp_path / "scored.tsv").open(), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert list(written[0]) == ["prediction", "p_0", "p_1", "sentence"]
    for row, given in zip(written, rows):
        p0, p1 = float(row["p_0"]), float(row["p_1"])
        assert abs(p0 + p1 - 1) < 1e-5 and 0 <= p0 <= 1
        assert row["prediction"] == ("0" if p0 > p1 else "1") and row["sentence"] == given["sentence"]
    from bertpre.model.checkpoint import load_classifier

    model, tokenizer, task = load_classifier(finetuned_checkpoint)  # the same probabilities, computed directly
    encoding = tokenizer.encode(rows[0]["sentence"])
    with torch.no_grad():
        logits = model(torch.tensor([encoding.ids]), torch.tensor([encoding.type_ids]), None)
    assert abs(logits.softmax(-1)[0, 1].item() - float(written[0]["p_1"])) < 1e-5
    main(["predict", "--checkpoint", str(finetuned_checkpoint), "--input", str(tmp_path / "in.jsonl"),
          "--output", str(tmp_path / "plain.tsv")])
    assert (tmp_path / "plain.tsv").read_text().splitlines()[0] == "prediction\tsentence"


def test_each_row_gets_its_own_prediction_whatever_its_batch(finetuned_checkpoint, sst2_slice, tmp_path):
    """predict batches rows of about one length together (longest first) and writes them back in the
    file's order: row for row the scores of the model run on that row alone."""
    from bertpre.model.checkpoint import load_classifier

    out = tmp_path / "scored.tsv"
    main(["predict", "--checkpoint", str(finetuned_checkpoint), "--input", str(sst2_slice / "dev.tsv"),
          "--output", str(out), "--scores", "--batch-size", "16", "--device", "cpu"])
    written = list(csv.DictReader(out.open(), delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\"))
    given = list(csv.DictReader((sst2_slice / "dev.tsv").open(), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [r["content"] for r in written] == [r["content"] for r in given]  # the file's order
    assert len({len(r["content"].split()) for r in given}) > 20  # rows of many lengths: batches differ from the file
    model, tokenizer, _ = load_classifier(finetuned_checkpoint)
    alone = []
    with torch.no_grad():
        for row in given:
            encoding = tokenizer.encode(row["content"])
            logits = model(torch.tensor([encoding.ids]), torch.tensor([encoding.type_ids]), None)  # (1, 2)
            alone.append(logits.softmax(-1)[0, 1].item())
    assert max(alone) - min(alone) > 1e-4  # the rows' scores differ, so a row given another's would show
    for row, p in zip(written, alone, strict=True):
        assert abs(float(row["p_1"]) - p) <= 2e-6  # printed to 6 decimals


def test_the_default_learning_rate_follows_the_encoder_size(pretrained, capsys):
    from bertpre.tasks.classifier import learning_rate_for

    assert learning_rate_for(128) == learning_rate_for(256) == 3e-4  # bert-tiny, bert-mini
    assert learning_rate_for(512) == 1e-4  # bert-small, bert-medium
    assert learning_rate_for(768) == learning_rate_for(1024) == 5e-5  # bert-base, bert-large
    module = ClassifierModule(str(pretrained))
    assert module.learning_rate == learning_rate_for(module.encoder.config.hidden_size)
    assert f"learning rate {module.learning_rate:g} (model.learning_rate unset: hidden size " in capsys.readouterr().out
    assert ClassifierModule(str(pretrained), learning_rate=3e-4).learning_rate == 3e-4
    with pytest.raises(UserError, match="model.learning_rate must be positive, got 0"):
        ClassifierModule(str(pretrained), learning_rate=0.0)


def test_a_classifier_saved_before_the_pooling_option_loads_with_cls_pooling(finetuned_checkpoint, tmp_path):
    from bertpre.model.checkpoint import load_classifier

    checkpoint = torch.load(finetuned_checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["bertpre_task"]["pooling"] == "cls"
    del checkpoint["bertpre_task"]["pooling"]
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    now, _, _ = load_classifier(finetuned_checkpoint)
    before, _, task = load_classifier(older)
    assert "pooling" not in task and before.pooling == "cls"
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    with torch.no_grad():
        assert torch.equal(before(ids, torch.zeros_like(ids), torch.ones_like(ids)),
                           now(ids, torch.zeros_like(ids), torch.ones_like(ids)))
