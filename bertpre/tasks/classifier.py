"""``bertpre finetune``: sequence classification on a pretrained encoder, the LightningModule.

The encoder comes from a bertpre checkpoint or an exported / HuggingFace BERT directory;
``random_init`` keeps its architecture and tokenizer but starts from BERT's random
initialisation (the baseline that shows what pretraining is worth). Head: dropout + linear on
the pooled [CLS] vector, as in BERT.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef

import bertpre
from bertpre.errors import UserError
from bertpre.model.bert import BertForPretraining, BertForSequenceClassification, check_dropout, check_pooling
from bertpre.model.checkpoint import TASK_KEY, load_pretrained
from bertpre.tasks.datamodule import TaskDataModule
from bertpre.training.nonfinite import NonFiniteGuard
from bertpre.training.optim import build_optimizer, clip_gradients
from bertpre.training.precision import use_tensor_cores

# Fine-tuning learning rate by encoder width: small BERTs want a larger rate than BERT-base's
# 2e-5..5e-5 (Devlin et al. 2019). Google's compact BERTs (Turc et al. 2019, "Well-Read Students
# Learn Better") were fine-tuned with the best of 3e-4, 1e-4, 5e-5, 3e-5. Measured for bert-mini
# on SST-2 2,000-sentence subsets (studies/transfer-mini): 3e-4 beat 1e-4 and 5e-5, from
# pretrained and from random weights. Hidden 512 (bert-small, -medium): unmeasured, 1e-4.
FINETUNE_LEARNING_RATES = ((256, 3e-4), (512, 1e-4), (None, 5e-5))  # (up to this hidden size, rate)


def learning_rate_for(hidden_size: int) -> float:
    """The default fine-tuning learning rate for an encoder of this hidden size."""
    return next(rate for limit, rate in FINETUNE_LEARNING_RATES if limit is None or hidden_size <= limit)


def starting_encoder(pretrained: str, dropout: dict[str, float], random_init: bool, reinit_pooler: bool,
                     reinit_layers: int):
    """The encoder fine-tuning starts from, and its tokenizer: the checkpoint's weights (with the
    given dropout rates), BERT's random initialisation instead (``random_init``), or the weights with
    the pooler and the top ``reinit_layers`` layers drawn anew from a copy of the random state (so
    everything else in the run draws the same numbers as without it)."""
    encoder, tokenizer = load_pretrained(pretrained, dropout)
    if not 0 <= reinit_layers <= encoder.config.num_layers:
        raise UserError(f"model.reinit_layers must be between 0 and the encoder's {encoder.config.num_layers} "
                        f"layers, got {reinit_layers}")
    if random_init:
        encoder = BertForPretraining.randomly_initialised(encoder.config)
    elif reinit_pooler or reinit_layers:
        with torch.random.fork_rng(devices=[]):
            if reinit_pooler:
                encoder.reset_pooler()
            encoder.reset_top_layers(reinit_layers)
    return encoder, tokenizer


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        pretrained: str,
        random_init: bool = False,
        reinit_pooler: bool = False,
        reinit_layers: int = 0,
        pooling: str = "cls",
        learning_rate: float | None = None,
        layer_lr_decay: float = 1.0,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        classifier_dropout: float = 0.1,
        hidden_dropout: float | None = 0.1,
        attention_dropout: float | None = 0.1,
        nonfinite: str = "skip",
        max_nonfinite_in_a_row: int = 10,
    ) -> None:
        """
        Args:
            pretrained: a bertpre checkpoint (.ckpt) or an exported / HuggingFace BERT directory
            random_init: same architecture and tokenizer, BERT's random initialisation instead of the weights
            reinit_pooler: start the pooler (the dense layer on [CLS] that pretraining trained for NSP)
                from BERT's random initialisation, keep the rest (Zhang et al. 2021, "Revisiting
                Few-sample BERT Fine-tuning"); drawn from a copy of the random state, so everything
                else in the run draws the same numbers as without it
            reinit_layers: start the top N encoder layers from BERT's random initialisation as well
                (Zhang et al. 2021: the top layers of a pretrained encoder are the most specific to
                its pretraining task); drawn like ``reinit_pooler``, the rest is the checkpoint's
            pooling: what the classification layer reads: "cls", BERT's pooled [CLS] vector (exports to
                transformers' BertForSequenceClassification), or "mean", the mean of the last hidden
                states over the real tokens (no pooler; better after a short pretraining, whose [CLS]
                was trained only for NSP: docs/checkpoints.md; does not export)
            learning_rate: peak learning rate; unset: by the encoder's size (see ``learning_rate_for``)
            layer_lr_decay: layer-wise learning-rate decay: the classifier and pooler train at the
                learning rate, the top encoder layer at this factor times it, each layer below at one
                more factor, the embeddings at one more again (see ``layer_lr_scales``); 1: one rate
                for all (BERT)
            weight_decay: AdamW weight decay (not on biases and LayerNorm)
            warmup_fraction: share of the steps spent in linear warmup (BERT: 10%)
            classifier_dropout: dropout before the classification layer
            hidden_dropout: the encoder's dropout on embeddings and sublayer outputs while fine-tuning
                (BERT's 0.1), whatever the pretraining used; null keeps the encoder's own rate (the
                shipped CPU pretraining recipe trains without dropout: docs/checkpoints.md)
            attention_dropout: the same for the attention probabilities
            nonfinite: a step whose loss or gradients are not finite is "skip"ped (no update) or makes
                the run "stop"
            max_nonfinite_in_a_row: with "skip", stop after this many non-finite steps in a row
        """
        super().__init__()
        self.save_hyperparameters()
        check_pooling(pooling)
        if reinit_pooler and pooling != "cls":
            raise UserError(f"model.reinit_pooler needs model.pooling cls (with {pooling} the pooler is not used)")
        dropout = {name: rate for name, rate in (("hidden_dropout", hidden_dropout),
                                                 ("attention_dropout", attention_dropout)) if rate is not None}
        for name, rate in {**dropout, "classifier_dropout": classifier_dropout}.items():
            check_dropout(f"model.{name}", rate)
        if not 0 < layer_lr_decay <= 1:
            raise UserError(f"model.layer_lr_decay must be in (0, 1], got {layer_lr_decay}")
        encoder, self.tokenizer = starting_encoder(pretrained, dropout, random_init, reinit_pooler, reinit_layers)
        self.encoder: BertForPretraining | None = encoder.train()  # until use_labels puts the head on it
        self.model: BertForSequenceClassification | None = None
        self.labels: list[str] | None = None
        self.columns: dict[str, Any] | None = None
        self.nonfinite_guard = NonFiniteGuard(nonfinite, max_nonfinite_in_a_row)
        if learning_rate is not None and learning_rate <= 0:
            raise UserError(f"model.learning_rate must be positive, got {learning_rate}")
        self.learning_rate = learning_rate or learning_rate_for(encoder.config.hidden_size)
        if learning_rate is None:
            print(f"learning rate {self.learning_rate:g} (model.learning_rate unset: hidden size "
                  f"{encoder.config.hidden_size})", flush=True)

    @property
    def max_positions(self) -> int:
        return (self.encoder or self.model.encoder).config.max_position_embeddings

    def connect(self, data: TaskDataModule) -> None:
        """Exchange what the task data and the classifier need of each other: the data takes the
        encoder's tokenizer and position limit, the classifier the data's classes and columns."""
        data.use_tokenizer(self.tokenizer, self.max_positions)
        self.use_labels(data.labels(), data.columns())

    def use_labels(self, labels: list[str], columns: dict[str, Any]) -> None:
        """The task's classes and input columns (given where the run is assembled): the
        classification head is made for them."""
        if self.model is None:
            self.model = BertForSequenceClassification(self.encoder, len(labels), self.hparams.classifier_dropout,
                                                       self.hparams.pooling)
            self.encoder = None
        self.labels, self.columns = list(labels), dict(columns)
        n = len(labels)
        self.metrics = torch.nn.ModuleDict({
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "matthews": MulticlassMatthewsCorrCoef(n),
            **({"f1": MulticlassF1Score(2, average=None)} if n == 2 else {}),
        })

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.nonfinite_guard]

    def on_fit_start(self) -> None:
        use_tensor_cores(self.device)  # fine-tuning's configs run fp32

    def setup(self, stage: str) -> None:
        if self.model is None:
            raise UserError("the classifier has no labels: connect it to the task data first "
                            "(model.connect(data))")

    def forward(self, input_ids, token_type_ids, attention_mask) -> torch.Tensor:
        return self.model(input_ids, token_type_ids, attention_mask)  # (B, labels)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.nonfinite_guard.observe(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]), batch_size=len(logits))
        predictions = logits.argmax(-1)
        for metric in self.metrics.values():
            metric.update(predictions, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.metrics.items():
            value = metric.compute()
            self.log(f"val/{name}", value[1] if name == "f1" else value, prog_bar=name == "accuracy")
            metric.reset()

    def configure_optimizers(self):
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            raise UserError("set trainer.max_epochs for fine-tuning (the schedule spans all epochs)")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, math.ceil(self.hparams.warmup_fraction * total))
        optimizer, scheduler = build_optimizer(self, "adamw", self.learning_rate, self.hparams.weight_decay,
                                               (0.9, 0.999), 1e-6, warmup, total,
                                               lr_scales=layer_lr_scales(self.model, self.hparams.layer_lr_decay))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm, self.trainer.precision_plugin)

    def _task_metadata(self) -> dict[str, Any]:
        return {
            "bertpre_version": bertpre.__version__,
            "model_config": asdict(self.model.config),
            "tokenizer": self.tokenizer.to_str(),
            "labels": self.labels,
            "columns": self.columns,
            "classifier_dropout": self.hparams.classifier_dropout,
            "pooling": self.hparams.pooling,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TASK_KEY] = self._task_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (``--ckpt_path``) continues one run: the model and task it saved must be this run's."""
        saved = checkpoint.get(TASK_KEY)
        if saved is None:
            raise UserError("ckpt_path: not a bertpre fine-tuning checkpoint")
        ours = self._task_metadata()
        changed = sorted(k for k in ours if k != "bertpre_version" and saved.get(k) != ours[k])
        if changed:
            raise UserError(f"ckpt_path: the run it saved differs from this one in {', '.join(changed)}; resume with "
                            f"the options that run was started with, or start a new run")


def layer_lr_scales(model: BertForSequenceClassification, decay: float) -> dict[int, float]:
    """Learning-rate factors for layer-wise decay (Howard & Ruder 2018, "discriminative
    fine-tuning"; ELECTRA, Clark et al. 2020), by ``id`` of each encoder parameter: of L layers,
    layer i (0 at the bottom) gets ``decay ** (L - i)``, the embeddings ``decay ** (L + 1)``; what is
    not listed (pooler, final norm, classifier) trains at the full rate. A decay of 1 gives every
    factor 1: BERT's two parameter groups."""
    layers = model.encoder.layers
    scales = {id(p): decay ** (len(layers) + 1) for p in model.encoder.embeddings.parameters()}
    for i, layer in enumerate(layers):
        scales.update({id(p): decay ** (len(layers) - i) for p in layer.parameters()})
    return scales
