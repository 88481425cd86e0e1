import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SAMPLE, fake_gpus

from bertpre.cli import main

TINY = str(ROOT / "configs" / "bert-tiny.yaml")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bertpre.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        rows.extend(csv.DictReader(path.open()))
    return rows


def series(rows, key):
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def length_rule_accuracy(data) -> float:
    """The best NSP accuracy of a threshold on the length of A alone, on the training pairs."""
    from bertpre.data.prepared import PreparedData

    train = PreparedData(data).load_dataset()["train"].with_format("numpy")
    sep = PreparedData(data).tokenizer.token_to_id("[SEP]")
    len_a = np.array([int(np.argmax(ids == sep)) - 1 for ids in train["input_ids"]])
    not_next = np.asarray(train["next_sentence_label"]) == 1
    accuracies = [np.mean(not_next == (len_a >= t)) for t in range(1, int(len_a.max()) + 2)]
    return float(max(max(accuracies), 1 - min(accuracies)))


@pytest.mark.slow
def test_prepare_then_train_then_resume_through_the_cli(tmp_path):
    data = tmp_path / "prepared"
    prepared = run_cli("prepare", "--input", str(SAMPLE), "--output", str(data), "--vocab-size", "2000",
                       "--max-seq-length", "64", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert f"prepared {data}" in prepared.stdout and "NotNext" in prepared.stdout
    run = tmp_path / "run"
    common = ["--config", TINY, "--data.path", str(data), "--trainer.default_root_dir", str(run),
              "--data.batch_size", "64", "--trainer.val_check_interval", "200", "--trainer.limit_val_batches", "20",
              "--trainer.enable_progress_bar", "false", "--model.learning_rate", "2e-3",
              "--trainer.log_every_n_steps", "1"]
    trained = run_cli("train", *common, "--trainer.max_steps", "400", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "trained 400 steps" in trained.stdout
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(run)
    first_step, start = series(rows, "train/mlm_accuracy")[0]
    assert first_step == 0
    val_mlm = series(rows, "val/mlm_accuracy")
    baseline = series(rows, "val/mlm_majority_accuracy")[-1][1]
    assert val_mlm[-1][0] == 399
    assert val_mlm[-1][1] > max(2 * start, baseline + 0.02), (start, baseline, val_mlm)
    # NSP: the pairs must not give the label away through the length of A (before long sentences were
    # split, a threshold on len(A) alone reached 0.61 on this data, and 400 steps of NSP "learning" rode on it;
    # without the leak bert-tiny stays near chance in 400 steps, so NSP learning is not asserted here).
    shortcut = length_rule_accuracy(data)
    assert shortcut < 0.56, f"the prepared pairs leak the NSP label through the length of A ({shortcut:.3f})"
    for key in ("train/loss", "train/mlm_loss", "train/nsp_loss", "train/nsp_accuracy", "train/lr",
                "val/loss", "val/mlm_perplexity", "perf/tokens_per_sec", "perf/samples_per_sec", "perf/mfu"):
        assert series(rows, key), key
    assert list(run.glob("logs/version_0/events.out.tfevents.*")), "TensorBoard events"

    resumed = run_cli("train", *common, "--trainer.max_steps", "440", "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trained 440 steps" in resumed.stdout
    new_steps = [step for step, _ in series(read_metrics(run), "train/loss") if step >= 400]
    assert new_steps and min(new_steps) >= 400 and max(new_steps) < 440


def cli_error(capsys, *args: str) -> str:
    """The error line of a failing command: exit status 2, no traceback, one `bertpre CMD: error:` line last.

    Lightning's own info lines (seed, accelerator) may come before it.
    """
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith(f"bertpre {args[0]}: error: ")
    return errors[0]


def test_prepare_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "input not found: " + str(tmp_path / "missing.txt") in cli_error(
        capsys, "prepare", "--input", str(tmp_path / "missing.txt"), "--output", out)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "the corpus is empty" in cli_error(capsys, "prepare", "--input", str(empty), "--output", out)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    assert f"{binary}: binary file" in cli_error(capsys, "prepare", "--input", str(binary), "--output", out)
    assert "--max-seq-length must be at least 8" in cli_error(
        capsys, "prepare", "--input", str(SAMPLE), "--output", out, "--max-seq-length", "4")
    bad_tokenizer = tmp_path / "tokenizer.json"
    bad_tokenizer.write_text("{}")
    assert "not a tokenizers JSON file" in cli_error(
        capsys, "prepare", "--input", str(SAMPLE), "--output", out, "--tokenizer", str(bad_tokenizer))
    no_mask = tmp_path / "vocab.txt"
    no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
    assert "has no [MASK] token" in cli_error(
        capsys, "prepare", "--input", str(SAMPLE), "--output", out, "--tokenizer", str(no_mask))
    assert not (tmp_path / "out").exists()


def test_train_errors_are_one_line(sample_prepared, tmp_path, capsys):
    base = ["train", "--config", TINY, "--data.path", str(sample_prepared), "--trainer.default_root_dir",
            str(tmp_path / "run"), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
    err = cli_error(capsys, *base, "--model.config.hiden_size", "64")
    assert "hiden_size" in err
    typo_config = tmp_path / "typo.yaml"
    typo_config.write_text((ROOT / "configs" / "bert-tiny.yaml").read_text().replace("batch_size:", "batch_sise:"))
    assert "batch_sise" in cli_error(capsys, "train", "--config", str(typo_config))
    assert "model.config.num_layers must be positive" in cli_error(capsys, *base, "--model.config.num_layers", "0")
    err = cli_error(capsys, *base, "--model.config.vocab_size", "100")
    assert "vocabulary mismatch" in err and "2000" in err
    err = cli_error(capsys, *base, "--model.config.max_position_embeddings", "32")
    assert "max_seq_length 64" in err and "max_position_embeddings 32" in err
    assert "not found" in cli_error(capsys, *base, "--data.path", str(tmp_path / "nowhere"))
    assert "set trainer.max_steps" in cli_error(capsys, *base, "--trainer.max_steps", "-1")


def test_a_gpu_this_machine_lacks_is_refused_in_one_line(sample_prepared, tmp_path, capsys, monkeypatch):
    """Asking for GPUs torch cannot see (a CPU-only build, CUDA_VISIBLE_DEVICES, fewer than trainer.devices)
    gets the reason in one line, as do the trainer options Lightning itself refuses, before anything is written."""
    run = tmp_path / "run"
    base = ["train", "--config", TINY, "--data.path", str(sample_prepared), "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
    fake_gpus(monkeypatch, gpus=0, cuda=None)
    assert cli_error(capsys, *base, "--trainer.accelerator", "gpu").startswith(
        "bertpre train: error: trainer.accelerator gpu: torch ")
    fake_gpus(monkeypatch, gpus=0, visible="")
    assert cli_error(capsys, *base, "--trainer.accelerator", "cuda").endswith(
        "trainer.accelerator cuda: CUDA_VISIBLE_DEVICES='' hides every GPU")
    fake_gpus(monkeypatch, gpus=1)
    assert cli_error(capsys, *base, "--trainer.accelerator", "gpu", "--trainer.devices", "2").endswith(
        "trainer.devices 2: torch sees 1 GPU (cuda:0)")
    monkeypatch.undo()
    assert cli_error(capsys, *base, "--trainer.val_check_interval", "-1").startswith(
        "bertpre train: error: trainer: You have passed invalid value -1 for val_check_interval")
    assert "`num_nodes` must be a positive integer" in cli_error(capsys, *base, "--trainer.num_nodes", "0")
    assert not run.exists() or not any(run.rglob("*")), list(run.rglob("*"))  # no logs, no checkpoints
    fake_gpus(monkeypatch, gpus=0, cuda=None)
    assert cli_error(capsys, "bench", "--device", "cuda:1").startswith("bertpre bench: error: --device cuda:1: torch ")
    assert cli_error(capsys, "bench", "--device", "gpu") == \
        "bertpre bench: error: --device gpu: not a device this command runs on (auto, cpu, cuda or cuda:N)"
    assert cli_error(capsys, "predict", "--checkpoint", "c.ckpt", "--input", "x.tsv", "--output", str(tmp_path / "p.tsv"),
                     "--device", "cuda").startswith("bertpre predict: error: --device cuda: torch ")
    mine = tmp_path / "results.json"
    mine.write_text("mine")
    assert cli_error(capsys, "bench", "--output", str(mine)) == \
        f"bertpre bench: error: --output {mine} exists (use --overwrite to replace it)"
    assert mine.read_text() == "mine"


def test_checkpoint_from_another_tokenizer_is_refused(sample_prepared, tmp_path, capsys):
    other = tmp_path / "other"
    prepared = main(["prepare", "--input", str(SAMPLE / "carroll-alice.txt"), "--output", str(other),
                     "--vocab-size", "1500", "--max-seq-length", "64"])
    assert prepared is None
    run = tmp_path / "run"
    main(["train", "--config", TINY, "--data.path", str(other), "--trainer.default_root_dir", str(run),
          "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"])
    capsys.readouterr()
    err = cli_error(capsys, "train", "--config", TINY, "--data.path", str(sample_prepared),
                    "--trainer.default_root_dir", str(tmp_path / "run2"), "--trainer.max_steps", "2",
                    "--model.init_from", str(run / "checkpoints" / "last.ckpt"))
    assert "vocabulary mismatch" in err
    assert not (tmp_path / "run2" / "logs").exists()  # a failed run leaves no empty logs/version_N


def test_init_from_may_change_dropout_but_not_the_architecture(sample_checkpoint, sample_prepared, tmp_path, capsys):
    """Continued pretraining may regularise anew (dropout), never change what the weights mean."""
    from bertpre.model.checkpoint import model_state, read_checkpoint

    base = ["train", "--config", TINY, "--data.path", str(sample_prepared), "--trainer.max_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
            "--model.init_from", str(sample_checkpoint)]
    run = tmp_path / "dropout"
    main([*base, "--trainer.default_root_dir", str(run), "--model.config.hidden_dropout", "0.1",
          "--model.config.attention_dropout", "0.1", "--model.config.initializer_range", "0.05"])
    saved, start = read_checkpoint(run / "checkpoints" / "last.ckpt"), read_checkpoint(sample_checkpoint)
    assert saved["bertpre"]["model_config"]["hidden_dropout"] == 0.1
    assert start["bertpre"]["model_config"]["hidden_dropout"] == 0.0
    after, before = model_state(saved), model_state(start)
    # one step from the loaded weights: they moved by about one learning-rate step, not by a new draw
    gap = max((after[k].float() - before[k].float()).abs().max().item() for k in before)
    assert 0 < gap < 0.01, gap
    capsys.readouterr()
    err = cli_error(capsys, *base, "--trainer.default_root_dir", str(tmp_path / "layers"),
                    "--model.config.num_heads", "4", "--model.config.hidden_dropout", "0.1")
    assert err.endswith("model config differs from this run's in num_heads"), err
    # resuming is the same run: there even the dropout must match
    err = cli_error(capsys, "train", "--config", TINY, "--data.path", str(sample_prepared),
                    "--trainer.default_root_dir", str(tmp_path / "resume"), "--trainer.max_steps", "12",
                    "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
                    "--ckpt_path", str(sample_checkpoint), "--model.config.hidden_dropout", "0.1")
    assert "hidden_dropout" in err and "num_heads" not in err, err


def test_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])  # no command: usage on stderr and exit 2, as argparse does for a missing argument
    assert exited.value.code == 2 and "prepare" in capsys.readouterr().err
    main(["--help"])
    assert capsys.readouterr().out.startswith("usage: bertpre")
    with pytest.raises(SystemExit):
        main(["pretrain"])
    assert "unknown command 'pretrain'" in capsys.readouterr().err


def test_vocabulary_padded_to_a_multiple(sample_prepared, tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--config", TINY, "--data.path", str(sample_prepared), "--trainer.default_root_dir", str(run),
          "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
          "--model.vocab_multiple_of", "64"])
    from bertpre.model.checkpoint import read_checkpoint

    saved = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved["bertpre"]["model_config"]["vocab_size"] == 2048  # the tokenizer has 2000
    assert saved["state_dict"]["model.embeddings.word.weight"].shape[0] == 2048


@pytest.mark.slow
def test_compiled_training_keeps_plain_checkpoint_names(sample_prepared, tmp_path):
    run = tmp_path / "run"
    main(["train", "--config", TINY, "--data.path", str(sample_prepared), "--trainer.default_root_dir", str(run),
          "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
          "--model.compile", "true"])
    from bertpre.model.checkpoint import read_checkpoint

    names = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"].keys()
    assert "model.embeddings.word.weight" in names and not any("_orig_mod" in n for n in names)
    from bertpre.model.export import export_checkpoint

    assert (export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "hf") / "model.safetensors").is_file()


def test_overwrite_starts_afresh_in_a_run_folder_of_another_run(sample_prepared, tmp_path, capsys):
    """A fresh run is refused over another run's checkpoints (see test_hostile_inputs); with
    --overwrite it deletes them and its summary names its own last.ckpt."""
    run = tmp_path / "run"
    args = ["train", "--config", TINY, "--data.path", str(sample_prepared), "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
    main(args + ["--trainer.max_steps", "4"])
    stale = run / "checkpoints" / "epoch=0-step=2.ckpt"
    stale.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())  # a step file the new run will not write
    capsys.readouterr()
    main(args + ["--trainer.max_steps", "3", "--overwrite", "true", "--trainer.log_every_n_steps", "1"])
    out = capsys.readouterr().out
    assert f"  checkpoint  {run / 'checkpoints' / 'last.ckpt'}\n" in out
    curves = run / "logs" / "version_1" / "curves.png"  # every run draws its own curves at its end
    assert f"  curves      {curves}\n" in out and curves.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    import torch

    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_short_help_leads_with_bertpres_options(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith(f"usage: bertpre {command} --config") and len(lines) < 80
    assert "--help-all" in text and "--data.batch_size (32)" in text and "--trainer.max_steps" in text
    assert "fit" not in lines[0]
    if command == "train":
        assert "'last-good'" in text and "--model.learning_rate (0.0001)" in text
        assert "--model.config.NAME" in text and "position_init" in text
    else:
        assert "--model.pretrained (required)" in text
    for line in lines:  # every option listed has a description
        if (line.startswith("  --model.") or line.startswith("  --data.")) and ".config.NAME" not in line:
            assert len(line.split(")  ", 1)) == 2 and line.split(")  ", 1)[1].strip(), line
