"""What several GPUs need, checked on CPU: no per-step collective or host sync in the training
step, ranks that agree about the run folder (and only rank 0 deleting in it), SIGUSR1 left to
SLURM's auto-requeue, sharded strategies refused."""

import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from test_static_step import DATA_DEPENDENT, OpCounter

from bertpre.errors import UserError
from bertpre.training.checkpointing import RunFolderCheck
from bertpre.training.preemption import PreemptionCheckpoint


class FakeStrategy:
    """The collectives of a 2-rank strategy, as this rank sees them: rank 0's objects broadcast,
    decisions reduced with the other rank's decision (``other``)."""

    def __init__(self, rank0_view=None, other: bool = True):
        self.rank0_view, self.other = rank0_view, other
        self.reduced = self.barriers = 0

    def broadcast(self, obj, src=0):
        return obj if self.rank0_view is None else self.rank0_view

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.reduced += 1
        return (decision and self.other) if all else (decision or self.other)

    def barrier(self):
        self.barriers += 1


def test_under_ddp_the_ranks_agree_to_stop_every_n_steps_not_every_step():
    """The per-step all-reduce (and host sync) is gone: with accumulation of 2 micro-batches, 40 steps
    give 80 batch ends and 4 agreements; a signal is still taken at the next agreement."""
    callback = PreemptionCheckpoint(agree_every_n_steps=10)
    strategy = FakeStrategy(other=False)  # the other rank has no signal: "any rank" stays False
    trainer = SimpleNamespace(world_size=2, global_step=0, strategy=strategy)
    callback.agreed_at = 0
    saved = []
    callback._save_and_stop = lambda t: saved.append(t.global_step)
    for batch in range(80):
        trainer.global_step = (batch + 1) // 2  # an optimizer step after every second micro-batch
        callback.on_train_batch_end(trainer, None)
    assert strategy.reduced == 4 and not saved
    callback.received = signal.SIGTERM  # arrives at step 41
    for batch in range(80, 100):
        trainer.global_step = (batch + 1) // 2
        callback.on_train_batch_end(trainer, None)
    assert saved == [50], "the ranks stop together at the next agreement"


def test_one_process_takes_a_signal_at_the_next_step_end_without_any_collective():
    callback = PreemptionCheckpoint()
    strategy = FakeStrategy()
    trainer = SimpleNamespace(world_size=1, global_step=3, strategy=strategy)
    saved = []
    callback._save_and_stop = lambda t: saved.append(t.global_step)
    callback.received = signal.SIGUSR1
    callback.on_train_batch_end(trainer, None)
    assert saved == [3] and strategy.reduced == 0


def test_sigusr1_is_left_to_a_handler_installed_before_training(tmp_path):
    """Under SLURM Lightning installs its auto-requeue handler for SIGUSR1 before training starts;
    bertpre's preemption handling takes SIGTERM and Ctrl-C but leaves SIGUSR1 to it."""
    def lightnings(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, lightnings)
    try:
        callback = PreemptionCheckpoint()
        trainer = SimpleNamespace(global_step=0, is_global_zero=True)
        callback.on_train_start(trainer, None)
        assert signal.getsignal(signal.SIGUSR1) is lightnings
        assert signal.getsignal(signal.SIGTERM) is callback.installed[signal.SIGTERM]
        callback.teardown(trainer, None, "fit")
        assert signal.getsignal(signal.SIGUSR1) is lightnings
    finally:
        signal.signal(signal.SIGUSR1, previous)
    callback = PreemptionCheckpoint()  # without one, bertpre takes SIGUSR1 as before
    callback.on_train_start(SimpleNamespace(global_step=0, is_global_zero=True), None)
    try:
        assert signal.getsignal(signal.SIGUSR1) is callback.installed[signal.SIGUSR1]
    finally:
        callback.teardown(None, None, "fit")


def folder_check(tmp_path, view, rank0_view=None, rank=1, other=True):
    stale = tmp_path / "epoch=0-step=10.ckpt"
    stale.write_bytes(b"x")
    check = RunFolderCheck()
    check.directory, check.view, check.stale = tmp_path, view, [stale]
    strategy = FakeStrategy(rank0_view, other)
    trainer = SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0, strategy=strategy)
    return check, trainer, stale


def test_ranks_that_see_different_run_folders_are_refused_in_one_line(tmp_path):
    """A run folder on node-local disks: rank 0 resumes from a checkpoint that rank 1 does not have."""
    check, trainer, stale = folder_check(tmp_path, view=([], None),
                                         rank0_view=(["epoch=0-step=10.ckpt", "last.ckpt"], "/r/last.ckpt"))
    with pytest.raises(UserError) as error:
        check.setup(trainer, None, "fit")
    message = str(error.value)
    assert "\n" not in message and f"trainer.default_root_dir ({tmp_path})" in message
    assert "rank 0 sees 2 checkpoints (last.ckpt, ...), resuming from last.ckpt; this rank (rank 1) sees no " \
           "checkpoints" in message and "every node shares" in message
    assert stale.exists(), "nothing deleted when the ranks disagree"
    # the rank that agrees with rank 0 learns of the disagreement too (the decision is reduced), and stops
    check, trainer, _ = folder_check(tmp_path, view=([], None), rank=0, other=False)
    with pytest.raises(UserError, match="the ranks see different run folders"):
        check.setup(trainer, None, "fit")


def test_only_rank_zero_deletes_the_stale_checkpoints_of_an_overwritten_run(tmp_path):
    check, trainer, stale = folder_check(tmp_path, view=(["epoch=0-step=10.ckpt"], None), rank=1)
    check.setup(trainer, None, "fit")
    assert stale.exists() and trainer.strategy.barriers == 1
    check, trainer, stale = folder_check(tmp_path, view=(["epoch=0-step=10.ckpt"], None), rank=0)
    check.setup(trainer, None, "fit")
    assert not stale.exists() and trainer.strategy.barriers == 1


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_2"])
def test_sharded_strategies_are_refused_in_one_line(strategy, sample_prepared, tmp_path, capsys):
    from conftest import ROOT

    from bertpre.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
              "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.strategy", strategy])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"bertpre train: error: trainer.strategy {strategy}: sharded training is not supported")
    assert not (tmp_path / "run" / "checkpoints").exists()


class SyncCounter(L.Callback):
    """Counts data-dependent ops (host reads of device values) from the start of each training batch
    (first of the callbacks) to ``close()``, which the module calls in its own on_train_batch_end,
    after every callback's (Lightning calls the module's hook last)."""

    def __init__(self):
        self.counter: OpCounter | None = None
        self.per_step: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.counter = OpCounter().__enter__()

    def close(self):
        self.counter.__exit__(None, None, None)
        self.per_step.append({k: v for k, v in self.counter.seen.items() if k in DATA_DEPENDENT})


def test_a_training_step_reads_nothing_from_the_device_and_logs_no_python_numbers(sample_prepared, tmp_path):
    """Every op of every step, from on_train_batch_start to the last on_train_batch_end hook (the
    model, loss, backward, clipping, the fused AdamW step, logging, bertpre's callbacks), is counted:
    no host read of a device value except at the guard's and the throughput window's checks. And
    nothing is logged as a Python number, which Lightning would copy to the device every step."""
    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    logged = []

    class Recording(PretrainModule):
        def log(self, name, value, *args, **kwargs):
            if self.trainer.training and not self.trainer.sanity_checking:
                logged.append((name, type(value)))
            return super().log(name, value, *args, **kwargs)

        def on_train_batch_end(self, *args):
            counter.close()

    module = Recording(BertConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                       nonfinite="stop", optimizer_implementation="fused")
    counter = SyncCounter()
    trainer = L.Trainer(max_steps=22, callbacks=[counter], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                        gradient_clip_val=1.0, accelerator="cpu", log_every_n_steps=50)
    trainer.callbacks.insert(0, trainer.callbacks.pop(trainer.callbacks.index(counter)))
    data = PretrainDataModule(str(sample_prepared), batch_size=4)
    connect(module, data)
    trainer.fit(module, data)
    assert len(counter.per_step) == 22
    busy = {i: seen for i, seen in enumerate(counter.per_step) if seen}
    # the throughput windows end at steps 9 (the first: skipped, nothing read) and 19 (one read)
    assert list(busy) == [19] and sum(busy[19].values()) == 1, busy
    assert logged and all(t is torch.Tensor for _, t in logged), sorted(set(logged))


BUCKET_VIEW = """
import sys
import lightning as L
from bertpre.cli import main
from bertpre.lightning_cli import BertpreCLI

class Look(L.Callback):
    def on_train_start(self, trainer, module):
        print("gradient_as_bucket_view", trainer.strategy.model.gradient_as_bucket_view)

original = BertpreCLI.instantiate_trainer

def with_look(self, **kwargs):
    trainer = original(self, **kwargs)
    trainer.callbacks.append(Look())
    return trainer

BertpreCLI.instantiate_trainer = with_look
main(sys.argv[1:])
"""


@pytest.mark.slow  # DDP training runs over gloo in subprocesses: the slow run
def test_ddp_keeps_gradients_as_views_into_its_buckets(sample_prepared, tmp_path):
    """DDP gets gradient_as_bucket_view (no copy of every gradient into the all-reduce buckets and back
    each step), whether `--trainer.strategy ddp` names it or Lightning picks it for several devices
    (strategy auto, as the shipped GPU configs leave it); one process, then two, over gloo train with it
    (in processes of their own: a process group and Lightning's DDP environment variables must not
    outlive them; from a script file, which Lightning's launcher runs again for the second rank)."""
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "look.py"
    script.write_text(BUCKET_VIEW)
    for strategy, devices in (("ddp", "1"), ("auto", "2")):
        done = subprocess.run(
            [sys.executable, str(script), "train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"),
             "--data.path", str(sample_prepared), "--trainer.default_root_dir", str(tmp_path / f"run-{strategy}"),
             "--trainer.strategy", strategy, "--trainer.devices", devices, "--trainer.accelerator", "cpu",
             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
             "--model.config.hidden_size", "32", "--model.config.num_heads", "2"],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("gradient_as_bucket_view True") == int(devices), (strategy, done.stdout[-2000:])
        assert "gradient_as_bucket_view False" not in done.stdout and "trained 2 steps" in done.stdout


def test_a_requeued_slurm_job_resumes_from_lightnings_hpc_checkpoint(sample_prepared, tmp_path, monkeypatch, capsys,
                                                                     caplog):
    """Under SLURM, Lightning's auto-requeue saves hpc_ckpt_N.ckpt in the run folder and requeues the job,
    which runs the same command again (no --ckpt_path): the folder's checkpoints are then its own, and
    it resumes from the hpc checkpoint instead of being refused as a run over another run's checkpoints."""
    import shutil

    from conftest import ROOT

    from bertpre.cli import main

    run = tmp_path / "run"
    common = ["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
              "--trainer.default_root_dir", str(run), "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
              "--model.config.hidden_size", "32", "--model.config.num_heads", "2"]
    main([*common, "--trainer.max_steps", "2"])
    shutil.copy(run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt")  # what the requeue handler saves
    capsys.readouterr()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "pretrain")
    for name in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.setenv(name, "0")
    with caplog.at_level("INFO"):
        main([*common, "--trainer.max_steps", "4"])
    out = capsys.readouterr().out
    assert "trained 4 steps" in out
    assert "hpc_ckpt_1.ckpt" in caplog.text, "Lightning restored the requeue checkpoint"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_the_cuda_branches_of_timing_and_precision_run_as_written(monkeypatch):
    """CI has no GPU: the CUDA-only lines run here against recording stand-ins. A throughput window
    is timed between two device syncs and logs the allocator's peak; a CUDA run (pretraining or
    fine-tuning) turns on TF32."""
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule
    from bertpre.training.throughput import ThroughputLogger

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda mode: calls.append(f"matmul {mode}"))
    logged = {}
    module = SimpleNamespace(device=torch.device("cuda"), config=BertConfig(vocab_size=100, hidden_size=8,
                             num_layers=1, num_heads=2, intermediate_size=16),
                             log=lambda name, value, **kw: logged.__setitem__(name, float(value)))
    logger = ThroughputLogger(window=2, skip_first=False)
    logger.peak = 1e12
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    trainer = SimpleNamespace(world_size=1)
    for i in range(2):
        logger.on_train_batch_start(trainer, module, batch, i)
        logger.on_train_batch_end(trainer, module, None, batch, i)
    assert calls == ["sync", "sync"], "the window starts and ends at a device sync"
    assert logged["perf/peak_memory_gb"] == 3.0 and logged["perf/tokens_per_sec"] > 0

    pretrain = PretrainModule(BertConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16))
    monkeypatch.setattr(PretrainModule, "device", property(lambda self: torch.device("cuda")))
    pretrain._trainer = SimpleNamespace(is_global_zero=False)
    pretrain.on_fit_start()
    assert calls[-1] == "matmul high"

    from bertpre.tasks.classifier import ClassifierModule  # fine-tuning runs fp32: TF32 too

    calls.clear()
    ClassifierModule.on_fit_start(SimpleNamespace(device=torch.device("cuda")))
    assert calls == ["matmul high"]
