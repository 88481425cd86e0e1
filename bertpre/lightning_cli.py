"""``bertpre train`` (PretrainModule + PretrainDataModule) and ``bertpre finetune``
(ClassifierModule + TaskDataModule), both through LightningCLI.

Every option lives in the YAML config and can be overridden on the command line. The run
folder is ``trainer.default_root_dir``: checkpoints go to ``<run>/checkpoints`` (so
``--ckpt_path last`` finds them again), TensorBoard events and ``metrics.csv`` to
``<run>/logs/version_N`` unless the config names its own loggers.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bertpre.data.datamodule import PretrainDataModule
from bertpre.errors import UserError
from bertpre.model.checkpoint import CHECKPOINT_KEY, TASK_KEY, read_checkpoint
from bertpre.training.checkpointing import (
    AtomicCheckpointIO,
    RunFolderCheck,
    check_checkpoint_file,
    check_writable,
    checkpoint_dir,
    resolve_ckpt_path,
    run_checkpoints,
)
from bertpre.training.curves import plot_curves
from bertpre.training.nonfinite import NonFiniteGuard
from bertpre.training.precision import emulated_bf16_warning, missing_cuda, resolve_precision
from bertpre.training.preemption import PreemptionCheckpoint
from bertpre.training.pretraining import PretrainModule
from bertpre.training.progress import ModelLine, StepProgressBar, quiet_lightning


def connect(model, data) -> None:
    """The one place where data and model meet, for both commands (each module's ``connect``
    says what it exchanges with its data). Call it before ``trainer.fit(model, data)`` when
    using the classes directly."""
    model.connect(data)


class BertpreCLI(LightningCLI):
    def __init__(self, *args, log_dirs: list[Path] | None = None, preemption: PreemptionCheckpoint | None = None,
                 **kwargs) -> None:
        self.log_dirs = [] if log_dirs is None else log_dirs  # filled as loggers are made: cleaned if the run fails
        self.preemption = preemption  # a pretraining run's signal handling, whose stop the command reports
        super().__init__(*args, **kwargs)

    # --- the two places where bertpre relies on Lightning's private API (tests/test_lightning_internals.py
    # fails if a Lightning release changes either): _parse_ckpt_path here, _enable_version_counter below
    def _parse_ckpt_path(self) -> None:
        """Lightning reads the hyperparameters of ``ckpt_path`` here (tensors only); a damaged
        or unsafe file gets bertpre's one-line error instead of a traceback.

        Lightning would also put the checkpoint's model options over those of the command line and
        config, silently, and only for a file path (``last`` is resolved later). bertpre keeps the
        command line's for every form: a resumed run checks that its model config is the
        checkpoint's (``on_load_checkpoint``) and refuses naming what differs."""
        given = self.config.clone()
        try:
            super()._parse_ckpt_path()
        except Exception:
            path = Path(self.config[self.config.subcommand].get("ckpt_path"))
            check_checkpoint_file(path)
            read_checkpoint(path, key=self._checkpoint_key(), kind="bertpre")
            raise
        self.config = given

    def _checkpoint_key(self) -> str:
        return CHECKPOINT_KEY if issubclass(self.model_class, PretrainModule) else TASK_KEY

    def option(self, config, key: str):
        """``key`` (dotted, e.g. ``trainer.strategy``) of the running subcommand's ``config``."""
        return config.get(str(self.subcommand), config).get(key)

    def add_arguments_to_parser(self, parser) -> None:
        # Lightning's module table lists internal rows and a FLOPs column of zeros; ModelLine prints one line
        parser.set_defaults({"trainer.enable_model_summary": False})
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="start afresh in a run folder that holds another run's checkpoints, deleting them "
                                 "(without it such a folder is refused unless --ckpt_path resumes it)")

    def instantiate_trainer(self, **kwargs):
        strategy = self.option(self.config_init, "trainer.strategy")
        check_strategy(strategy)
        check_gpus(self.option(self.config_init, "trainer.accelerator"),
                   self.option(self.config_init, "trainer.devices"))
        ddp_with_bucket_views()
        root = Path(self.option(self.config_init, "trainer.default_root_dir") or ".")
        check_writable(root, "trainer.default_root_dir")
        plugins = self.option(self.config_init, "trainer.plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if self.option(self.config_init, "trainer.precision") is None and not any(
                isinstance(p, Precision) for p in plugins):
            precision, why = resolve_precision(self.option(self.config_init, "trainer.accelerator"))
            kwargs["precision"] = precision
            if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
                print(f"precision {precision} (trainer.precision unset: {why})", flush=True)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except UserError:
            raise
        except (MisconfigurationException, ValueError, ModuleNotFoundError) as e:
            # Lightning's word on trainer options that cannot work (here): a bad value, a missing accelerator
            raise UserError("trainer: " + " ".join(str(e).split())) from None
        warning = emulated_bf16_warning(trainer.strategy.root_device.type, str(trainer.precision))
        if warning and trainer.is_global_zero:
            print(warning, flush=True)
        root = Path(trainer.default_root_dir)
        if self.option(self.config, "trainer.logger") in (None, True):
            tensorboard = TensorBoardLogger(root, name="logs", default_hp_metric=False)
            trainer.loggers = [tensorboard, CSVLogger(root, name="logs", version=tensorboard.version)]
            self.log_dirs.append(Path(tensorboard.log_dir))
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                if callback.dirpath is None:
                    callback.dirpath = str(root / "checkpoints")
                # last.ckpt is always this run's newest (no last-v1.ckpt beside a stale last.ckpt); another
                # run's checkpoints are refused in before_fit, so nothing else of value can be replaced
                callback._enable_version_counter = False  # Lightning private (see _parse_ckpt_path)
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # Lightning's default bar counts batches per epoch (`Epoch 0/-2` in a step-based run); a user's own
        # progress bar class is kept
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) in (TQDMProgressBar, RichProgressBar):
                trainer.callbacks[i] = StepProgressBar()
        trainer.callbacks.append(ModelLine())
        trainer.callbacks.append(RunFolderCheck())
        if self.preemption is not None:
            trainer.callbacks.append(self.preemption)
        return trainer

    def before_fit(self) -> None:
        """Check the checkpoint to resume from (and resolve ``last-good``) before any work; refuse to
        start afresh over another run's checkpoints unless told to (``--overwrite``)."""
        connect(self.model, self.datamodule)
        directory = checkpoint_dir(self.trainer)
        config = self.config_init[self.subcommand]
        existing = run_checkpoints(directory)
        folder = next(c for c in self.trainer.callbacks if isinstance(c, RunFolderCheck))
        folder.directory, folder.stale = directory, []
        requeued = slurm_requeued(Path(self.trainer.default_root_dir))
        if existing and config.get("ckpt_path") is None and not requeued:
            if not config.get("overwrite"):
                raise UserError(f"{directory} holds checkpoints of an earlier run ({existing[-1].name}, ...); resume "
                                "it with --ckpt_path last, choose another trainer.default_root_dir, or pass "
                                "--overwrite true to delete them and start afresh")
            folder.stale = existing  # deleted by rank 0 once the ranks agree on what the folder holds
        config["ckpt_path"] = resolve_ckpt_path(config.get("ckpt_path"), directory)
        folder.view = ([p.name for p in existing], config["ckpt_path"])
        config["weights_only"] = True  # Lightning restores tensors and plain data only: nothing in the file runs

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.global_rank != 0:
            return
        stopped = self.preemption.stopped if self.preemption else None
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
        if trainer.global_step == 0 and stopped is None:
            raise UserError("no training step ran (trainer.max_steps, trainer.max_time or the data allowed none); "
                            "no checkpoint written")
        if guard is not None and guard.skipped and guard.succeeded == 0:
            raise UserError(f"every step of this run was non-finite ({len(guard.skipped)} skipped); the weights did "
                            "not change (check the initial weights, model.learning_rate and the data)")
        lines = [f"trained {trainer.global_step} steps"]
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint):
            written = [Path(p) for p in (stopped[1] if stopped else None, callback.last_model_path,
                                         callback.best_model_path) if p]
            written = [p for p in written if p.is_file()]
            if written:
                lines.append(f"  checkpoint  {max(written, key=lambda p: p.stat().st_mtime)}")
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                if (Path(logger.log_dir) / "metrics.csv").is_file():
                    lines.append(f"  metrics     {Path(logger.log_dir) / 'metrics.csv'}")
                    threshold = getattr(self.model, "plateau_min_gain", None)
                    lines.append(f"  curves      {plot_curves(Path(logger.log_dir), threshold=threshold)}")
            elif isinstance(logger, TensorBoardLogger) and Path(logger.log_dir).is_dir():
                lines.append(f"  tensorboard tensorboard --logdir {logger.log_dir}")
        metrics = trainer.callback_metrics
        shown = sorted(k for k in metrics if k.startswith("val/") and not k.endswith("loss"))
        if shown:
            lines.append("  " + "   ".join(f"{k} {float(metrics[k]):.4f}" for k in shown))
        print("\n".join(lines))
        code = self.preemption.report() if self.preemption else None
        if code is not None:
            sys.exit(code)


def train_cli(argv: list[str], command: str = "train") -> BertpreCLI:
    """Run ``bertpre train`` (pretraining) or ``bertpre finetune`` (classification) with ``argv``."""
    if argv and argv[0] in ("fit", "validate", "test", "predict"):
        raise UserError(f"`bertpre {command}` runs Lightning's fit; drop the {argv[0]!r}")
    if command == "finetune":
        from bertpre.tasks.classifier import ClassifierModule
        from bertpre.tasks.datamodule import TaskDataModule

        classes = (ClassifierModule, TaskDataModule)
    else:
        classes = (PretrainModule, PretrainDataModule)
    if any(a in ("-h", "--help") for a in argv):
        from bertpre.help import short_help

        print(short_help(command, *classes))
        sys.exit(0)
    argv = ["--help" if a == "--help-all" else a for a in argv]
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    quiet_lightning()
    # TensorBoard and CSV share logs/version_N; the CSV logger warns about the TensorBoard files there.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    # `bertpre train ARGS` hands ARGS to LightningCLI, which warns because sys.argv holds them too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning vs torch 2.13
    # fine-tuning epochs are often shorter than the logging interval: the metrics are logged at epoch end
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging")
    log_dirs: list[Path] = []
    preemption = PreemptionCheckpoint() if command == "train" else None
    try:
        return BertpreCLI(
            *classes,
            log_dirs=log_dirs,
            preemption=preemption,
            args=["fit", *argv],
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "prog": f"bertpre {command}", "fit": {"exit_on_error": False}},
            seed_everything_default=1234,
            auto_configure_optimizers=False,
        )
    except ArgumentError as e:
        raise UserError(" ".join(str(e).split())) from None
    except pickle.UnpicklingError:  # a resumed checkpoint that holds more than tensors and plain data
        raise UserError("ckpt_path: not a readable checkpoint (it holds objects other than tensors and plain data; "
                        "such files are never loaded)") from None
    except SIGTERMException:  # Lightning stops after the step in which SIGTERM arrived
        sys.exit((preemption.report() if preemption else None) or 128 + signal.SIGTERM)
    except BaseException:
        for directory in log_dirs:
            remove_if_no_metrics(directory)
        raise


def check_strategy(strategy) -> None:
    """Sharded strategies are refused: gradient clipping (``bertpre.training.optim.clip_gradients``) and LAMB's
    trust ratios take norms of the gradients and weights a process holds, which under FSDP or
    DeepSpeed are shards, so each rank would clip and scale by its own shard's norm."""
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if name and any(word in name.lower() for word in ("fsdp", "deepspeed", "modelparallel")):
        raise UserError(f"trainer.strategy {name}: sharded training is not supported (gradient clipping and LAMB "
                        "would use per-shard norms); use ddp, which holds BERT-large with room to spare on one GPU")


def ddp_with_bucket_views() -> None:
    """DDP as ``--trainer.strategy ddp`` names it and as Lightning picks it for several devices
    (strategy auto) keeps gradients as views into its all-reduce buckets: no copy of every gradient
    into the buckets and back each step, one gradient-sized buffer less. A DDPStrategy the user
    configures is kept as it is."""
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    params = {**StrategyRegistry["ddp"]["init_params"], "gradient_as_bucket_view": True}
    StrategyRegistry.register("ddp", DDPStrategy, "DDP, gradients as views into its buckets (bertpre)",
                              override=True, **params)


def check_gpus(accelerator, devices) -> None:
    """A run that asks for GPUs (trainer.accelerator gpu or cuda) where torch finds none, or fewer
    than trainer.devices, is refused in one line saying why (Lightning's own error is a traceback)."""
    if not (isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda")):
        return
    why = missing_cuda()
    if why:
        raise UserError(f"trainer.accelerator {accelerator}: {why}")
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):  # GPUs per node
        why = missing_cuda(f"cuda:{int(devices) - 1}") if int(devices) > 1 else None
        if why:
            raise UserError(f"trainer.devices {devices}: {why}")


def slurm_requeued(root: Path) -> bool:
    """A SLURM job that Lightning's auto-requeue saved (``hpc_ckpt_N.ckpt`` in the run folder) and
    requeued: run with the same command, it resumes from that checkpoint (Lightning picks it when no
    ``ckpt_path`` is given), so the folder's checkpoints are its own, not another run's."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect() and any(root.glob("hpc_ckpt_*.ckpt"))


# what a run's log folder holds before its first logged step: removed with the folder when the run fails
SET_UP_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.*")


def remove_if_no_metrics(log_dir: Path) -> None:
    """Remove ``log_dir`` (and an emptied ``logs/``) when it holds nothing but set-up files and no
    logged metric (the CSV logger, beside TensorBoard in the same folder, writes every metric logged):
    a run that failed before logging leaves no empty ``version_N`` behind. Anything else keeps it."""
    if not log_dir.is_dir():
        return
    files = list(log_dir.iterdir())
    metrics = log_dir / "metrics.csv"
    if metrics.is_file() and len(metrics.read_text(encoding="utf-8", errors="replace").splitlines()) > 1:
        return
    if any(f.is_dir() or not (f.name == "metrics.csv" or any(f.match(p) for p in SET_UP_FILES)) for f in files):
        return
    for f in files:
        f.unlink()
    log_dir.rmdir()
    if log_dir.parent.name == "logs" and not any(log_dir.parent.iterdir()):
        log_dir.parent.rmdir()
