"""Faults done for real: SIGKILL between checkpoints, SIGTERM / SIGUSR1, a kill during a save,
corrupted checkpoints, non-finite steps, an unwritable or full disk, unsafe pickles."""

import csv
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, gradient_poison

from bertpre.cli import main
from bertpre.training.checkpointing import checkpoint_problem

CHECKPOINT_EVERY = 20
STEPS = 100


def write_config(tmp_path: Path, data: Path, run: Path, steps: int = STEPS, workers: int = 2, **model) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "bert-tiny.yaml").read_text())
    # with dropout on, an exact resume also has to restore the dropout generator
    config["model"]["config"].update(hidden_dropout=0.1, attention_dropout=0.1)
    config["model"].update(model)
    config["data"].update(path=str(data), batch_size=8, num_workers=workers)
    config["trainer"].update(default_root_dir=str(run), max_steps=steps, log_every_n_steps=1, val_check_interval=25,
                             limit_val_batches=2, enable_progress_bar=False)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=CHECKPOINT_EVERY)
    path = tmp_path / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bertpre.cli", "train", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def losses(run: Path, version: int) -> dict[int, float]:
    rows = csv.DictReader((run / "logs" / f"version_{version}" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(sample_prepared, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """An uninterrupted run: the per-step losses every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    code, out, err = finish(train(write_config(tmp, sample_prepared, run)))
    assert code == 0 and f"trained {STEPS} steps" in out, err[-3000:]
    return run, losses(run, 0)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_gives_the_same_losses(sample_prepared, reference, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path, sample_prepared, run)
    process = train(config)
    wait_for((run / "checkpoints" / "last.ckpt").exists, process)  # written after the step file
    time.sleep(0.1)  # a few steps past the checkpoint
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "checkpoints" / f"epoch=0-step={2 * CHECKPOINT_EVERY}.ckpt").exists(), "killed too late"
    assert step_of(run / "checkpoints" / "last.ckpt") == CHECKPOINT_EVERY
    code, out, err = finish(train(config, "--ckpt_path", "last"))
    assert code == 0 and f"trained {STEPS} steps" in out, err[-3000:]
    resumed = losses(run, 1)
    expected = reference[1]
    assert sorted(resumed) == list(range(CHECKPOINT_EVERY, STEPS))
    assert max(abs(resumed[s] - expected[s]) for s in resumed) <= 1e-6, [(s, resumed[s], expected[s]) for s in resumed]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_preemption_signal_saves_a_checkpoint_before_exit(sample_prepared, reference, tmp_path, signum):
    run = tmp_path / "run"
    config = write_config(tmp_path, sample_prepared, run)
    process = train(config)
    wait_for((run / "checkpoints" / f"epoch=0-step={CHECKPOINT_EVERY}.ckpt").exists, process)
    time.sleep(0.5)
    os.kill(process.pid, signum)
    code, out, err = finish(process)
    assert code == 128 + signum, err[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    stopped_at = step_of(last)
    assert CHECKPOINT_EVERY <= stopped_at < STEPS
    assert f"stopped by {signum.name} after step {stopped_at}; checkpoint {last}; resume with the same command " \
           f"and --ckpt_path last" in out
    code, out, err = finish(train(config, "--ckpt_path", "last"))
    assert code == 0, err[-3000:]
    assert f"  checkpoint  {last}\n" in out and step_of(last) == STEPS, "last.ckpt is the resumed run's newest"
    assert not list(last.parent.glob("last-v*.ckpt")), "no versioned last beside a stale last.ckpt"
    resumed, expected = losses(run, 1), reference[1]
    assert min(resumed) == stopped_at
    assert max(abs(resumed[s] - expected[s]) for s in resumed) <= 1e-6


KILL_DURING_SECOND_LAST_SAVE = """
import builtins, os, signal, sys
import bertpre.outputs
writes = []
def open_(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    if str(path).endswith(".tmp"):
        writes.append(path)
        if len(writes) == 4:  # the second last.ckpt: write half of it, then die as a preempted node would
            real_write = f.write
            def write(data):
                real_write(bytes(data)[: len(data) // 2]); f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            f.write = write
    return f
bertpre.outputs.open = open_
from bertpre.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(sample_prepared, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path, sample_prepared, run, workers=0)
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_LAST_SAVE, "train", "--config", str(config)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = run / "checkpoints"
    assert checkpoint_problem(checkpoints / "last.ckpt") is None, "last.ckpt is the first one, whole"
    assert step_of(checkpoints / "last.ckpt") == CHECKPOINT_EVERY
    leftovers = list(checkpoints.glob(".*.tmp"))
    assert leftovers and checkpoint_problem(leftovers[0]) is not None, "the half-written file is the temporary one"
    code, out, err = finish(train(config, "--ckpt_path", "last"))
    assert code == 0 and f"trained {STEPS} steps" in out, err[-3000:]


@pytest.mark.slow
def test_a_corrupt_checkpoint_names_the_previous_good_one_and_last_good_resumes(sample_prepared, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path, sample_prepared, run, steps=3 * CHECKPOINT_EVERY, workers=0)
    code, _, err = finish(train(config))
    assert code == 0, err[-3000:]
    checkpoints = run / "checkpoints"
    last = checkpoints / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # truncated, as by a full disk or a bad copy
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 20)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    good = checkpoints / f"epoch=0-step={3 * CHECKPOINT_EVERY}.ckpt"
    assert err.startswith(f"bertpre train: error: ckpt_path {last}: truncated or not a checkpoint: ")
    assert err.endswith(f"; the newest good one is {good} (resume with --ckpt_path last-good)")
    middle = checkpoints / f"epoch=0-step={2 * CHECKPOINT_EVERY}.ckpt"
    middle.write_bytes(middle.read_bytes()[:-100] + bytes(100))  # damaged inside
    assert checkpoint_problem(middle) is not None
    main(["train", "--config", str(config), "--ckpt_path", "last-good", "--trainer.max_steps", str(STEPS + 20)])
    assert f"trained {STEPS + 20} steps" in capsys.readouterr().out
    assert min(losses(run, 1)) == 3 * CHECKPOINT_EVERY, "resumed from the newest good checkpoint"


def test_a_non_finite_step_is_reported_and_skipped(sample_prepared, tmp_path, capsys):
    import lightning as L

    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    poison = gradient_poison(5, lambda module: next(module.model.parameters()), float("nan"))
    module = PretrainModule(BertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    trainer = L.Trainer(max_steps=10, callbacks=[poison], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0)
    data = PretrainDataModule(str(sample_prepared), batch_size=4)
    connect(module, data)
    trainer.fit(module, data)
    assert "bertpre: step 6: non-finite gradient norm nan; batch skipped (1 in a row)" in capsys.readouterr().out
    assert all(torch.equal(poison.before[k], poison.after[k]) for k in poison.before), "no update at the bad step"
    assert module.nonfinite_guard.skipped == [6] and trainer.global_step == 10
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_a_diverging_run_stops_and_never_saves_non_finite_weights(sample_prepared, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path, sample_prepared, run, workers=0, learning_rate=1e4, nonfinite="stop",
                          warmup_fraction=0.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(config), "--trainer.gradient_clip_val", "null"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bertpre train: error: step ") and "non-finite" in err, err
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_an_unwritable_run_folder_is_refused_before_training(sample_prepared, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path, sample_prepared, blocker / "run", workers=0)
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"bertpre train: error: trainer.default_root_dir {blocker}/run: cannot write there (Not a directory)"


def test_too_little_free_space_is_refused_before_training(sample_prepared, tmp_path, capsys, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", "--config", str(write_config(tmp_path, sample_prepared, run, workers=0))])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"bertpre train: error: trainer.default_root_dir {run}/checkpoints: 1 MB free, but the run "
                          "keeps up to 4 checkpoints of about ")
    assert not list(run.glob("checkpoints/*.ckpt")) and not (run / "logs" / "version_0" / "metrics.csv").exists()


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow  # 30-60 s on this 2-core machine; in CI's slow run
def test_a_full_disk_during_a_checkpoint_save_is_a_clear_error(sample_prepared, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path, sample_prepared, run, workers=0)
    code, _out, err = finish(train(config, preexec_fn=_limit_file_size(1_000_000)))
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"bertpre train: error: cannot write checkpoint {run}/checkpoints/"
                                            f"epoch=0-step={CHECKPOINT_EVERY}.ckpt (disk full); the previous "
                                            "checkpoints are intact")
    assert not list((run / "checkpoints").glob("*")), "no partial checkpoint, no temporary file"


def test_a_full_disk_during_prepare_leaves_nothing(sample_prepared, tmp_path):
    from conftest import gutenberg_books

    out = tmp_path / "prepared"
    done = subprocess.run([sys.executable, "-m", "bertpre.cli", "prepare", "--input", *gutenberg_books(), "--output",
                           str(out), "--tokenizer", str(sample_prepared)], capture_output=True, text=True,
                          preexec_fn=_limit_file_size(2_000_000), timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (f"bertpre prepare: error: --output {out}: disk full while "
                                                    "writing (File too large); nothing was written")
    assert list(tmp_path.iterdir()) == [], "neither the output nor the staging folder"


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.marker}",))


def test_a_pickle_that_runs_code_is_refused_everywhere(sample_prepared, tmp_path, capsys):
    Exploit.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"bertpre": Exploit(), "state_dict": {}}, evil)
    evil_pickle = tmp_path / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps(Exploit()))
    config = write_config(tmp_path, sample_prepared, tmp_path / "run", workers=0)
    attempts = [["export", str(evil), "--output", str(tmp_path / "out")],
                ["train", "--config", str(config), "--ckpt_path", str(evil)],
                ["train", "--config", str(config), "--model.init_from", str(evil)],
                ["predict", "--checkpoint", str(evil), "--input", "x.tsv", "--output", str(tmp_path / "p.tsv")],
                ["export", str(evil_pickle), "--output", str(tmp_path / "out")]]
    for argv in attempts:
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"bertpre {argv[0]}: error: ") and "not a readable checkpoint" in err, (argv, err)
    assert not Exploit.marker.exists(), "no code from a checkpoint ran"


@pytest.mark.slow  # 30-60 s on this 2-core machine; in CI's slow run
def test_resume_from_a_checkpoint_saved_at_an_epoch_end(sample_prepared, tmp_path):
    import lightning as L
    from conftest import SAMPLE
    from lightning.pytorch.callbacks import ModelCheckpoint

    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.data.pairs import PairOptions
    from bertpre.data.prepare import PrepareOptions, prepare
    from bertpre.data.prepared import PreparedData
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    corpus = tmp_path / "small.txt"
    corpus.write_text("".join((SAMPLE / "carroll-alice.txt").read_text(errors="replace").splitlines(True)[:400]))
    data = tmp_path / "data"
    prepare(PrepareOptions(inputs=[str(corpus)], output=data, tokenizer=str(sample_prepared),
                           pairs=PairOptions(max_seq_length=64), validation_fraction=0))
    per_epoch = len(PreparedData(data).load_dataset()["train"]) // 8
    assert per_epoch >= 3

    class Stop(Exception):
        pass

    def run(root: Path, stop_at: int | None = None, ckpt_path: str | None = None) -> dict[int, float]:
        losses: dict[int, float] = {}

        class Record(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if trainer.global_step == stop_at:
                    raise Stop  # dies right after the checkpoint of the epoch's last step

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                losses[trainer.global_step] = float(outputs["loss"])

        L.seed_everything(1234)
        module = PretrainModule(BertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                learning_rate=1e-3)
        trainer = L.Trainer(max_steps=3 * per_epoch, logger=False, enable_progress_bar=False, default_root_dir=root,
                            limit_val_batches=0, callbacks=[Record(), ModelCheckpoint(
                                dirpath=root / "checkpoints", every_n_train_steps=per_epoch, save_last=True)])
        try:
            datamodule = PretrainDataModule(str(data), batch_size=8, num_workers=0)
            connect(module, datamodule)
            trainer.fit(module, datamodule, ckpt_path=ckpt_path)
        except Stop:
            pass
        return losses

    uninterrupted = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=2 * per_epoch)
    assert step_of(tmp_path / "b" / "checkpoints" / "last.ckpt") == 2 * per_epoch
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert sorted(resumed) == list(range(2 * per_epoch + 1, 3 * per_epoch + 1)), "one more epoch, no batch twice"
    assert all(abs(resumed[s] - uninterrupted[s]) <= 1e-6 for s in resumed)


def test_a_signal_late_in_a_step_is_taken_after_the_next_and_the_resume_is_exact(sample_prepared, tmp_path):
    """SIGTERM that lands after the preemption callback's turn in a step (here sent by a callback
    that runs after it) must still give a checkpoint at a step boundary: the resumed run trains
    and logs every later step once, with the uninterrupted run's losses."""
    import lightning as L

    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.preemption import PreemptionCheckpoint
    from bertpre.training.pretraining import PretrainModule

    steps, late_in = 6, 2

    def run(root: Path, kill: bool = False, ckpt_path: str | None = None) -> tuple[dict[int, float], object]:
        losses: dict[int, float] = {}

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                losses[trainer.global_step] = float(outputs["loss"])
                if kill and trainer.global_step == late_in:
                    os.kill(os.getpid(), signal.SIGTERM)  # after PreemptionCheckpoint's turn in this step

        L.seed_everything(1234)
        module = PretrainModule(BertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                learning_rate=1e-3)
        preemption = PreemptionCheckpoint()
        trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, default_root_dir=root,
                            limit_val_batches=0, enable_checkpointing=False, callbacks=[preemption, Record()])
        datamodule = PretrainDataModule(str(sample_prepared), batch_size=4, num_workers=0)
        connect(module, datamodule)
        trainer.fit(module, datamodule, ckpt_path=ckpt_path)
        return losses, preemption

    uninterrupted, _ = run(tmp_path / "a")
    stopped, preemption = run(tmp_path / "b", kill=True)
    assert preemption.stopped is not None and preemption.stopped[0] == signal.SIGTERM
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert preemption.step == step_of(last) == late_in + 1 == max(stopped), "saved after the next full step"
    resumed, _ = run(tmp_path / "b", ckpt_path=str(last))
    assert sorted(resumed) == list(range(late_in + 2, steps + 1)), "every later step once"
    assert all(abs(resumed[s] - uninterrupted[s]) <= 1e-6 for s in resumed), (resumed, uninterrupted)


def test_a_run_that_stops_between_checkpoint_intervals_ends_with_its_last_step_saved(sample_prepared, tmp_path):
    run = tmp_path / "run"
    main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
          "--trainer.default_root_dir", str(run), "--trainer.max_steps", "7", "--trainer.limit_val_batches", "0",
          "--trainer.enable_progress_bar", "false", "--data.batch_size", "4"])  # the config saves every 200 steps
    assert step_of(run / "checkpoints" / "last.ckpt") == 7


CHECKPOINT_PEAK = """
import resource, sys, torch
from bertpre.training.checkpointing import AtomicCheckpointIO
state = {"state_dict": {"w": torch.ones(50_000_000)}}  # 200 MB of weights
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
AtomicCheckpointIO().save_checkpoint(state, sys.argv[1])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow  # 200 MB saved in a subprocess, 10 s here; in CI's slow run
def test_a_checkpoint_is_streamed_to_disk_not_built_in_memory_first(tmp_path):
    """A bert-large training checkpoint is about 4 GB: writing it must not hold a second copy in RAM.
    Saving 200 MB of weights raises this process's peak memory by far less than 200 MB (it rose by
    the whole file when the checkpoint was serialised into a buffer first), and the file loads back."""
    path = tmp_path / "big.ckpt"
    done = subprocess.run([sys.executable, "-c", CHECKPOINT_PEAK, str(path)], capture_output=True, text=True,
                          check=True)
    growth_mb = float(done.stdout.strip().splitlines()[-1])
    assert growth_mb < 50, f"peak memory rose by {growth_mb:.0f} MB while saving 200 MB"
    assert torch.load(path, weights_only=True)["state_dict"]["w"].sum() == 50_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["big.ckpt"], "no temporary file left"
