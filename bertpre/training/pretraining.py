"""LightningModule for MLM + NSP pretraining.

The model is built in ``configure_model``, after ``bertpre.lightning_cli.connect`` has handed it what
it needs from the prepared data (``use_data``): the vocabulary size comes from the tokenizer
unless the config sets one (which may be larger, e.g. padded to a multiple of 64). Checkpoints carry a ``bertpre``
entry with the resolved model config and the tokenizer, so they stand on their own.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, replace
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from torchmetrics import MeanMetric, SumMetric

import bertpre
from bertpre.data.datamodule import HAS_PADDING, PretrainDataModule
from bertpre.data.masking import IGNORE_INDEX
from bertpre.data.prepared import PreparedData
from bertpre.data.tokenizer import special_ids
from bertpre.errors import UserError
from bertpre.model.bert import DROPOUT_FIELDS, INIT_ONLY_FIELDS, BertConfig, BertForPretraining, config_differences
from bertpre.model.checkpoint import CHECKPOINT_KEY, model_state, read_checkpoint
from bertpre.training.checkpointing import FinalCheckpoint, check_free_space, checkpoint_bytes, checkpoint_dir
from bertpre.training.loss import pretraining_loss
from bertpre.training.nonfinite import NonFiniteGuard, all_finite
from bertpre.training.optim import (
    build_optimizer,
    clip_gradients,
    step_schedule,
    time_schedule,
)
from bertpre.training.options import check_options
from bertpre.training.plateau import ordinary_ids, random_context
from bertpre.training.precision import use_tensor_cores
from bertpre.training.throughput import ThroughputLogger

# what a run started from another checkpoint's weights may set anew
# a checkpoint to start from may differ in these: dropout, initialisation, and whether it has a
# sentence head (its MLM weights carry over between objectives; a missing head starts from random)
INIT_FROM_MAY_DIFFER = (*DROPOUT_FIELDS, *INIT_ONLY_FIELDS, "sentence_head")
# logged as train/<name> and val/<name>, "sentence" under the data's objective (nsp_loss, sop_accuracy);
# the sentence metrics are absent for --objective none
METRICS = ("loss", "mlm_loss", "sentence_loss", "mlm_accuracy", "sentence_accuracy")


class PretrainModule(L.LightningModule):
    def __init__(
        self,
        config: BertConfig = BertConfig(),
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-6,
        warmup_fraction: float = 0.01,
        lr_schedule: str = "linear",
        decay_fraction: float = 0.2,
        schedule_by: str = "steps",
        init_from: str | None = None,
        optimizer: str = "adamw",
        optimizer_implementation: str = "auto",
        vocab_multiple_of: int = 1,
        compile: bool = False,
        compile_mode: str | None = None,
        activation_checkpointing: bool = False,
        nonfinite: str = "skip",
        max_nonfinite_in_a_row: int = 10,
        context_gain_batches: int = 8,
        plateau_check_fraction: float = 0.3,
        plateau_min_gain: float = 0.02,
    ) -> None:
        """
        Args:
            config: model architecture (see bertpre.model.bert.BertConfig)
            learning_rate: peak learning rate after warmup
            weight_decay: AdamW weight decay (not applied to biases and LayerNorm)
            adam_betas: AdamW betas
            adam_eps: AdamW epsilon
            warmup_fraction: share of the run spent in linear warmup
            lr_schedule: after warmup, "linear" decay to 0 (BERT), "cosine" decay to 0, "wsd"
                (warmup-stable-decay: constant, then linear to 0 over the last decay_fraction of the run)
                or "constant"
            decay_fraction: with "wsd", the share of the run spent decaying
            schedule_by: "steps": the schedule spans trainer.max_steps (with trainer.max_time set too, the share
                of whichever budget is further along); "time": it spans trainer.max_time, read as the run goes,
                so a run given a time budget warms up, decays and ends at 0 within it
            init_from: a bertpre checkpoint whose weights start this run (e.g. phase 2 from phase 1)
            optimizer: "adamw" or "lamb" (for batches of many thousands)
            optimizer_implementation: AdamW's kernel: "auto" (fused on CUDA and CPU, torch's default elsewhere),
                "fused", "foreach" or "for-loop"; each works with gradient clipping and every precision
            vocab_multiple_of: when vocab_size is taken from the tokenizer, round it up to a multiple
                of this (64 suits GPU tensor cores); the extra rows are never predicted
            compile: torch.compile the model
            compile_mode: torch.compile's mode (bertpre.training.options.COMPILE_MODES; None: torch's default)
            activation_checkpointing: recompute encoder layers in the backward pass (less memory, about
                a third more compute), for long sequences
            nonfinite: a step whose loss or gradients are not finite is "skip"ped (no update) or
                "stop"s the run; either way it is reported with its step number
            max_nonfinite_in_a_row: with "skip", stop after this many non-finite steps in a row
            context_gain_batches: validation batches (from the first) on which val/mlm_context_gain is
                measured: MLM accuracy with real context minus accuracy with the unmasked tokens replaced by
                random ones (0 turns it off)
            plateau_check_fraction: at the first validation after this share of the run (trainer.max_steps, else trainer.max_time), a context
                gain below plateau_min_gain prints one warning: the model is on the MLM plateau
            plateau_min_gain: see plateau_check_fraction
        """
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # every option, as passed
        super().__init__()
        check_options(given)
        self.config, self.init_from, self.vocab_multiple_of = config, init_from, vocab_multiple_of
        self.learning_rate, self.weight_decay, self.warmup_fraction = learning_rate, weight_decay, warmup_fraction
        self.adam_betas, self.adam_eps = tuple(adam_betas), adam_eps
        self.lr_schedule, self.decay_fraction, self.schedule_by = lr_schedule, decay_fraction, schedule_by
        self.optimizer_name, self.optimizer_implementation = optimizer, optimizer_implementation
        self.compile_model, self.compile_mode, self.activation_checkpointing = compile, compile_mode, activation_checkpointing
        self.nonfinite_guard = NonFiniteGuard(nonfinite, max_nonfinite_in_a_row)
        self.context_gain_batches, self.plateau_checked = context_gain_batches, False
        self.plateau_check_fraction, self.plateau_min_gain = plateau_check_fraction, plateau_min_gain
        # plain data only (checkpoints load with weights_only): the config as a dict, the betas as a list
        self.save_hyperparameters({**given, "config": asdict(config), "adam_betas": list(adam_betas)})
        self.model: BertForPretraining | None = None
        self.tokenizer_json: str | None = None
        self.tokenizer_fingerprint: str | None = None
        self.special_ids: torch.Tensor | None = None
        self.ordinary_ids: torch.Tensor | None = None
        self.objective = "nsp"  # the prepared data's sentence objective (use_data)
        self._validation_metrics()

    def _validation_metrics(self) -> None:
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in METRICS})
        self.val_target_counts: torch.Tensor | None = None  # for the most-frequent-token baseline
        # correct predictions and predictions on the context-gain slice, with real and with random context
        self.context_counts = torch.nn.ModuleDict({name: SumMetric() for name in ("real", "random", "predicted")})

    # --- wiring ---------------------------------------------------------------------------
    def connect(self, data: PretrainDataModule) -> None:
        """Take the vocabulary, sequence length and tokenizer from the prepared data; a compiled
        model has every batch padded to that length (it is never recompiled for a new one)."""
        prepared = data.prepare()
        self.use_data(prepared)
        if self.compile_model:
            data.pad_to_multiple_of = prepared.max_seq_length

    def use_data(self, prepared: PreparedData) -> None:
        """What the model takes from the prepared data (given where the run is assembled): the
        vocabulary, the sequence length and the tokenizer that goes into every checkpoint."""
        config = self.config
        if config.vocab_size is None:
            multiple = self.vocab_multiple_of
            config = replace(config, vocab_size=-(-prepared.vocab_size // multiple) * multiple)
        elif config.vocab_size < prepared.vocab_size:
            raise UserError(
                f"vocabulary mismatch: model.config.vocab_size is {config.vocab_size} but the tokenizer of "
                f"{prepared.path} has {prepared.vocab_size} tokens"
            )
        config = config.for_data(prepared.record.sentence_label, f"{prepared.path} was prepared with --objective "
                                 f"{prepared.record.objective}")
        if prepared.max_seq_length > config.max_position_embeddings:
            raise UserError(
                f"{prepared.path} was prepared with max_seq_length {prepared.max_seq_length}, above "
                f"model.config.max_position_embeddings {config.max_position_embeddings}"
            )
        self.config = config
        self.objective = prepared.record.objective
        self.tokenizer_json = prepared.tokenizer.to_str()
        self.tokenizer_fingerprint = prepared.fingerprint
        special = list(special_ids(prepared.tokenizer).all)
        self.special_ids = torch.tensor(special, dtype=torch.long)
        self.ordinary_ids = ordinary_ids(prepared.vocab_size, special)

    def _logged(self, name: str) -> str:
        return name.replace("sentence", self.objective)

    # --- model construction -------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.tokenizer_json is None:
            raise UserError("the pretraining module has no data: connect it first (bertpre.lightning_cli.connect(model, "
                            "data), done by `bertpre train`)")
        self.model = BertForPretraining(self.config)
        self.model.activation_checkpointing = self.activation_checkpointing
        if self.init_from:
            self._load_initial_weights(self.init_from)
        if self.compile_model:
            self.model.compile(mode=self.compile_mode)  # in place: parameter names stay free of "_orig_mod."

    def _load_initial_weights(self, path: str) -> None:
        checkpoint = read_checkpoint(path)
        self._check_compatible(checkpoint[CHECKPOINT_KEY], f"model.init_from {path}", may_differ=INIT_FROM_MAY_DIFFER)
        state = model_state(checkpoint)
        if self.model.nsp is None:  # MLM only: the checkpoint's sentence head has no place
            state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "nsp."))}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith(("pooler.", "nsp.")) for k in missing), (missing, unexpected)

    def _check_compatible(self, saved: dict[str, Any], source: str, may_differ: tuple[str, ...] = ()) -> None:
        """The checkpoint must come from this tokenizer and this model config (``may_differ`` excepted)."""
        if saved["tokenizer_fingerprint"] != self.tokenizer_fingerprint:
            raise UserError(
                f"vocabulary mismatch: {source} was trained with a different tokenizer than the one in "
                f"data.path; prepare the data with `--tokenizer` pointing to the checkpoint's tokenizer"
            )
        changed = config_differences(saved["model_config"], asdict(self.config), ignore=may_differ)
        if changed:
            raise UserError(f"{source}: model config differs from this run's in {', '.join(changed)}")

    def configure_callbacks(self):
        return [ThroughputLogger(), self.nonfinite_guard, FinalCheckpoint()]

    def on_fit_start(self) -> None:
        """Before any step: the run folder must be writable and hold the checkpoints the run keeps."""
        trainer = self.trainer
        use_tensor_cores(self.device)
        if not trainer.is_global_zero:
            return
        kept = 1  # the temporary file of an atomic save
        for callback in trainer.checkpoint_callbacks:
            top_k = callback.save_top_k
            if top_k < 0:
                every = getattr(callback, "_every_n_train_steps", 0) or trainer.max_steps
                top_k = math.ceil(trainer.max_steps / max(every, 1))
            kept += top_k + (1 if callback.save_last else 0)
        directory = checkpoint_dir(trainer)
        optimizer_states = 2 if self.optimizer_name in ("adamw", "lamb") else 1
        check_free_space(directory, checkpoint_bytes(self.model, optimizer_states), kept, "trainer.default_root_dir")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Dropout's randomness for this step comes from (seed, step, rank, and the micro-batch
        within the step under gradient accumulation) alone, so a resumed run draws exactly what
        an uninterrupted one would (masks are seeded by the data)."""
        entropy = [int(os.environ.get("PL_GLOBAL_SEED", 0)), self.trainer.global_step, self.global_rank]
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate > 1:  # the micro-batches of one optimizer step draw different dropout masks
            entropy.append(batch_idx % accumulate)
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1))

    # --- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is not None and not all_finite(self.model):
            raise UserError(f"step {self.trainer.global_step}: the weights are not finite; no checkpoint written "
                            "(the previous checkpoints hold finite weights)")
        checkpoint[CHECKPOINT_KEY] = {
            "bertpre_version": bertpre.__version__,
            "model_config": asdict(self.config),
            "tokenizer": self.tokenizer_json,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            raise UserError("ckpt_path: not a bertpre checkpoint")
        self._check_compatible(checkpoint[CHECKPOINT_KEY], "ckpt_path")

    # --- steps --------------------------------------------------------------------------
    @staticmethod
    def _attention_mask(batch: dict[str, Any]) -> torch.Tensor | None:
        """The batch's attention mask, or None for a batch without padding (see PretrainDataModule):
        attention without a mask can use a Flash kernel on GPU."""
        return batch["attention_mask"] if batch.get(HAS_PADDING, True) else None

    def _step(self, batch: dict[str, torch.Tensor]):
        """Loss on the batch's fixed prediction slots: shapes independent of the data, no host sync."""
        mlm_logits, sentence_logits = self.model(
            batch["input_ids"], batch["token_type_ids"], self._attention_mask(batch), positions=batch["mlm_positions"]
        )  # (B, P, V), (B, 2) or None (no sentence head)
        labels = batch.get("next_sentence_label") if sentence_logits is not None else None
        return pretraining_loss(mlm_logits, batch["mlm_labels"], sentence_logits, labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        self.nonfinite_guard.observe(out.loss)  # checked with the gradients before the optimizer step
        size = batch["input_ids"].shape[0]
        for name in METRICS:
            if getattr(out, name) is not None:
                self.log(f"train/{self._logged(name)}", getattr(out, name), batch_size=size,
                         prog_bar=name in ("loss", "mlm_accuracy"))
        # a host tensor: Lightning would copy a Python float to the device, a host sync every step
        self.log("train/lr", torch.tensor(self.lr_schedulers().get_last_lr()[0], dtype=torch.float32),
                 batch_size=size)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._step(batch)
        if batch_idx < self.context_gain_batches:
            self._context_gain_update(batch, batch_idx, real_correct=out.mlm_accuracy * out.num_predicted)
        size = batch["input_ids"].shape[0]
        for name in METRICS:
            if getattr(out, name) is not None:
                self.val_metrics[name].update(getattr(out, name), out.num_predicted if name.startswith("mlm") else size)
        labels = batch["mlm_labels"].flatten()  # (B * P,): the predicted ids, IGNORE_INDEX in empty slots
        predicted = labels != IGNORE_INDEX
        counts = torch.zeros(self.config.vocab_size, dtype=torch.long, device=labels.device)
        counts.scatter_add_(0, labels.clamp(min=0), predicted.long())  # no data-dependent shape, no sync
        self.val_target_counts = counts if self.val_target_counts is None else self.val_target_counts + counts

    def _context_gain_update(self, batch: dict[str, torch.Tensor], batch_idx: int, real_correct=None) -> None:
        """Correct predictions on this batch with real context (``real_correct`` when the caller has
        them) and with random context, at the batch's fixed prediction slots (the shapes of the
        training step: nothing data-dependent, so a compiled model is not recompiled)."""
        labels, slot_labels = batch["labels"], batch["mlm_labels"]  # (B, T), (B, P)
        filled = slot_labels != IGNORE_INDEX
        generator = torch.Generator(device=labels.device).manual_seed(batch_idx)
        shuffled = random_context(batch["input_ids"], labels, batch["attention_mask"], self.ordinary_ids,
                                  self.special_ids.to(labels.device), generator)
        inputs = {"random": shuffled} if real_correct is not None else {"real": batch["input_ids"], "random": shuffled}
        for name, ids in inputs.items():
            mlm_logits, _ = self.model(ids, batch["token_type_ids"], self._attention_mask(batch),
                                       positions=batch["mlm_positions"])  # (B, P, V)
            self.context_counts[name].update(((mlm_logits.argmax(-1) == slot_labels) & filled).sum())
        if real_correct is not None:
            self.context_counts["real"].update(real_correct)
        self.context_counts["predicted"].update(filled.sum())

    def _log_context_gain(self) -> None:
        counts = {name: metric.compute() for name, metric in self.context_counts.items()}
        for metric in self.context_counts.values():
            metric.reset()
        if counts["predicted"] <= 0:
            return
        random_accuracy = counts["random"] / counts["predicted"]
        gain = (counts["real"] - counts["random"]) / counts["predicted"]
        self.log("val/mlm_random_context_accuracy", random_accuracy)
        self.log("val/mlm_context_gain", gain)
        trainer = self.trainer
        if self.plateau_checked or trainer.sanity_checking:
            return
        share = self._run_share()
        if share is not None and share >= self.plateau_check_fraction:
            self.plateau_checked = True
            if float(gain) < self.plateau_min_gain and trainer.is_global_zero:
                print(f"bertpre: warning: step {trainer.global_step} ({100 * share:.0f}% "
                      f"of the run): val/mlm_context_gain {float(gain):.3f} (below model.plateau_min_gain "
                      f"{self.plateau_min_gain}): the model barely uses context, the MLM plateau; it needs more "
                      "steps or another recipe (docs/results.md, Learning)", file=sys.stderr, flush=True)

    def _run_share(self) -> float | None:
        """The share of the run done: of trainer.max_steps or of trainer.max_time, whichever is
        further along (the one that will end the run); None if neither bounds it."""
        trainer = self.trainer
        shares = []
        if trainer.max_steps and trainer.max_steps > 0:
            shares.append(trainer.global_step / trainer.max_steps)
        timer = self._timer()
        if timer is not None:
            elapsed = timer.time_elapsed()
            shares.append(elapsed / max(elapsed + timer.time_remaining(), 1e-9))
        return max(shares) if shares else None

    def _timer(self) -> Timer | None:
        """Lightning's Timer when trainer.max_time bounds the run (it keeps its time through a resume)."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        return None if timer is None or timer.time_remaining() is None else timer

    def on_validation_epoch_end(self) -> None:
        self._log_context_gain()
        values = {name: metric.compute() for name, metric in self.val_metrics.items()
                  if self.objective != "none" or not name.startswith("sentence")}
        for name, value in values.items():
            self.log(f"val/{self._logged(name)}", value, prog_bar=name == "mlm_accuracy")
            self.val_metrics[name].reset()
        self.log("val/mlm_perplexity", torch.exp(values["mlm_loss"]))
        if self.val_target_counts is not None:
            counts = self.trainer.strategy.reduce(self.val_target_counts.float(), reduce_op="sum")
            # accuracy of always predicting the most frequent masked token: the bar MLM must clear
            self.log("val/mlm_majority_accuracy", counts.max() / counts.sum())
            self.val_target_counts = None

    # --- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        total = self.trainer.max_steps  # not estimated_stepping_batches: Lightning #20550
        if self.schedule_by == "time":
            multiplier = time_schedule(self._time_budget_used(), self.warmup_fraction, self.lr_schedule,
                                       self.decay_fraction)
        else:
            bounded = total is not None and total > 0
            if not bounded and self._timer() is None:
                raise UserError("set trainer.max_steps: the learning-rate schedule ends at max_steps "
                                "(or trainer.max_time, or set model.schedule_by time with trainer.max_time)")
            if bounded:
                warmup = max(1, math.ceil(self.warmup_fraction * total))
                multiplier = step_schedule(warmup, total, self.lr_schedule, self.decay_fraction)
            if self._timer() is not None:
                # trainer.max_time may end the run before max_steps: the schedule runs on the share of
                # whichever budget is further along, so a run stopped by the clock has warmed up and
                # decayed within it (rather than stopping inside a warmup meant for max_steps)
                multiplier = time_schedule(self._run_share, self.warmup_fraction, self.lr_schedule,
                                           self.decay_fraction)
                if self.trainer.is_global_zero:
                    print("schedule over trainer.max_steps or trainer.max_time, whichever ends the run first",
                          flush=True)
        optimizer, scheduler = build_optimizer(
            self.model, self.optimizer_name, self.learning_rate, self.weight_decay, self.adam_betas, self.adam_eps,
            0, total, self.optimizer_implementation, multiplier,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _time_budget_used(self):
        """() -> the share of trainer.max_time used so far (Lightning's Timer, which a resumed run
        restores), for model.schedule_by time."""
        timer = self._timer()
        if timer is None:
            raise UserError("model.schedule_by time needs trainer.max_time (e.g. --trainer.max_time 00:01:00:00)")

        def used() -> float:
            elapsed, remaining = timer.time_elapsed(), timer.time_remaining()
            return elapsed / max(elapsed + remaining, 1e-9)

        return used

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm, self.trainer.precision_plugin)
