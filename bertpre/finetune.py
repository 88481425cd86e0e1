"""``bertpre finetune`` and ``bertpre predict``: sequence classification on a pretrained encoder.

Data: TSV (GLUE's files as they are), CSV or JSONL with a text column, an optional
text-pair column and a label column. The encoder comes from a bertpre checkpoint or an
exported / HuggingFace BERT directory; ``random_init`` keeps its architecture and
tokenizer but starts from BERT's random initialisation (the baseline that shows what
pretraining is worth). Head: dropout + linear on the pooled [CLS] vector, as in BERT.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef

import bertpre
from bertpre.checkpoint import TASK_KEY, load_classifier, load_pretrained
from bertpre.errors import UserError
from bertpre.faults import NonFiniteGuard
from bertpre.model import BertForPretraining, BertForSequenceClassification, check_dropout, check_pooling
from bertpre.optim import build_optimizer, clip_gradients
from bertpre.outputs import atomic_write, check_apart, check_replaceable, output_lock
from bertpre.tokenizer import special_ids


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a .tsv, .csv or .jsonl file (first line of TSV/CSV is the header)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            rows = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        # a JSON null is a missing value, not the text "None"
                        rows.append({k: "" if v is None else str(v) for k, v in json.loads(line).items()})
                    except (json.JSONDecodeError, AttributeError):
                        raise UserError(f"{path}:{lineno}: not a JSON object") from None
            return rows
        if suffix not in (".tsv", ".csv"):
            raise UserError(f"{path}: expected a .tsv, .csv or .jsonl file")
        csv.field_size_limit(sys.maxsize)
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if suffix == ".tsv" else (",", csv.QUOTE_MINIMAL)
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        rows = []
        for row in reader:
            if None in row or None in row.values():  # DictReader's marks of a row longer or shorter than the header
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise UserError(f"{path}:{reader.line_num}: {fields} fields, but the header has "
                                f"{len(reader.fieldnames)}")
            rows.append(row)
        return rows


def pick_column(rows: list[dict[str, str]], names: str | list[str], path: str, option: str) -> str:
    candidates = [names] if isinstance(names, str) else list(names)
    available = list(rows[0]) if rows else []
    for name in candidates:
        if name in available:
            return name
    raise UserError(f"{path}: no column {' or '.join(map(repr, candidates))} (columns: {', '.join(available)}; "
                    f"set {option})")


class TaskDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_file: str,
        validation_file: str,
        text_column: str | list[str] = "sentence",
        text_pair_column: str | list[str] | None = None,
        label_column: str = "label",
        max_seq_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        max_train_examples: int | None = None,
        subset_seed: int = 0,
    ) -> None:
        """
        Args:
            train_file: .tsv / .csv / .jsonl with a header
            validation_file: same format; its accuracy is reported each epoch
            text_column: column with the text; a list accepts the first name present in each file
            text_pair_column: second text column for sentence-pair tasks
            label_column: column with the label (any strings; classes are those of the training file)
            max_seq_length: longer inputs are truncated (longest side first)
            batch_size: examples per batch
            num_workers: DataLoader workers
            max_train_examples: train on a random subset of this many rows (low-resource runs, learning curves)
            subset_seed: seed of that subset (the same seed gives the same rows)
        """
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.train_file, self.validation_file = train_file, validation_file
        self.text_column, self.text_pair_column, self.label_column = text_column, text_pair_column, label_column
        self.max_seq_length, self.batch_size, self.num_workers = max_seq_length, batch_size, num_workers
        if max_train_examples is not None and max_train_examples < batch_size:
            raise UserError(f"data.max_train_examples must be at least data.batch_size ({batch_size}), "
                            f"got {max_train_examples}")
        self.max_train_examples, self.subset_seed = max_train_examples, subset_seed
        if max_seq_length < 3:
            raise UserError(f"data.max_seq_length must be at least 3, got {max_seq_length}")
        self._train_rows: list[dict[str, str]] | None = None
        self._labels: list[str] | None = None
        self.tokenizer: Tokenizer | None = None  # the encoder's, given by use_tokenizer
        self.encoded: dict[str, list[tuple[list[int], list[int], int]]] = {}

    def columns(self) -> dict[str, Any]:
        return {"text_column": self.text_column, "text_pair_column": self.text_pair_column,
                "label_column": self.label_column, "max_seq_length": self.max_seq_length}

    def labels(self) -> list[str]:
        """The classes: the label column's distinct values in the training file, sorted."""
        if self._labels is None:
            rows = self._read_train()
            label_column = pick_column(rows, self.label_column, self.train_file, "data.label_column")
            labels = sorted({row[label_column] for row in rows})
            if len(labels) < 2:
                raise UserError(f"{self.train_file}: column {label_column!r} has a single class {labels}")
            self._labels = labels
        return self._labels

    def _read_train(self) -> list[dict[str, str]]:
        if self._train_rows is None:
            rows = read_table(self.train_file)
            if not rows:
                raise UserError(f"{self.train_file}: no rows")
            self._train_rows = rows
        return self._train_rows

    def use_tokenizer(self, tokenizer: Tokenizer, max_positions: int) -> None:
        """The encoder's tokenizer and position limit (given where the run is assembled)."""
        if self.max_seq_length > max_positions:
            raise UserError(f"data.max_seq_length {self.max_seq_length} is above the encoder's "
                            f"max_position_embeddings {max_positions}")
        self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        if self.encoded:
            return
        if self.tokenizer is None:
            raise UserError("the task data has no tokenizer: connect it to the model first "
                            "(bertpre.finetune.connect(model, data))")
        train_rows = self._read_train()
        if self.max_train_examples is not None:
            train_rows = sample_rows(train_rows, self.max_train_examples, self.subset_seed)
        for split, path, rows in (("train", self.train_file, train_rows),
                                  ("validation", self.validation_file, read_table(self.validation_file))):
            self.encoded[split] = encode_rows(rows, path, self.tokenizer, self.columns(), self.labels())

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        pad = special_ids(self.tokenizer).pad
        return DataLoader(self.encoded[split], batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle,
                          collate_fn=partial(collate, pad_id=pad), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)


def sample_rows(rows: list[dict[str, str]], count: int, seed: int) -> list[dict[str, str]]:
    """A random subset of ``count`` rows in file order; the same seed gives the same subset."""
    if count >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [rows[i] for i in sorted(order[:count].tolist())]


def encode_rows(rows, path, tokenizer: Tokenizer, columns: dict, labels: list[str] | None):
    """(ids, token types, label index or -1) per row, truncated to max_seq_length."""
    if not rows:
        raise UserError(f"{path}: no rows")
    text = pick_column(rows, columns["text_column"], path, "data.text_column")
    pair = pick_column(rows, columns["text_pair_column"], path, "data.text_pair_column") \
        if columns["text_pair_column"] else None
    if labels is not None:  # a labelled file (training or validation) must have the label column
        pick_column(rows, columns["label_column"], path, "data.label_column")
    empty = [number for number, r in enumerate(rows, 1) if not r[text].strip()]  # data rows, from 1
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        print(f"bertpre: warning: {path}: {len(empty)} of {len(rows)} rows have an empty {text!r} "
              f"(rows {shown}); they are kept", file=sys.stderr, flush=True)
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.enable_truncation(columns["max_seq_length"], strategy="longest_first")
    inputs = [(r[text], r[pair]) if pair else r[text] for r in rows]
    encodings = tokenizer.encode_batch(inputs)
    index = {label: i for i, label in enumerate(labels or [])}
    out = []
    for lineno, (row, enc) in enumerate(zip(rows, encodings), 2):
        label = row.get(columns["label_column"])
        if labels is not None and label is not None and label not in index:
            raise UserError(f"{path}:{lineno}: label {label!r} is not one of the training labels {labels}")
        out.append((enc.ids, enc.type_ids, index.get(label, -1)))
    return out


def collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_types, _) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        types[i, : len(row_types)] = torch.tensor(row_types)
        mask[i, : len(row_ids)] = 1
    labels = torch.tensor([label for _, _, label in rows], dtype=torch.long)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


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

    def setup(self, stage: str) -> None:
        if self.model is None:
            raise UserError("the classifier has no labels: connect it to the task data first "
                            "(bertpre.finetune.connect(model, data))")

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


def connect(model: ClassifierModule, data: TaskDataModule) -> None:
    """The one place where task data and classifier meet: the data takes the encoder's tokenizer
    and position limit, the classifier the data's classes and columns."""
    data.use_tokenizer(model.tokenizer, model.max_positions)
    model.use_labels(data.labels(), data.columns())


def predict_file(checkpoint_path: str | Path, input_path: str | Path, output_path: str | Path,
                 batch_size: int = 64, overwrite: bool = False, scores: bool = False) -> int:
    """Write ``prediction`` (with ``scores``: one ``p_<label>`` probability column per class)
    and the input's columns for every row of ``input_path`` (.tsv, .csv or .jsonl) as a TSV;
    returns the row count."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    check_apart(output_path, [input_path, checkpoint_path])
    check_replaceable(output_path, overwrite, "file")
    model, tokenizer, task = load_classifier(checkpoint_path)
    rows = read_table(input_path)
    encoded = encode_rows(rows, str(input_path), tokenizer, task["columns"], labels=None)
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], special_ids(tokenizer).pad)
            logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # (B, labels)
            probabilities.append(logits.float().softmax(-1))
    probabilities = torch.cat(probabilities)  # (rows, labels)
    assert len(probabilities) == len(rows), "one prediction per row"
    labels = task["labels"]
    predictions = probabilities.argmax(-1).tolist()
    score_columns = [f"p_{label}" for label in labels] if scores else []

    def write(f) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.writer(text, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["prediction", *score_columns, *rows[0].keys()])
        for row, p, probs in zip(rows, predictions, probabilities.tolist()):
            shown = [f"{q:.6f}" for q in probs] if scores else []
            writer.writerow([labels[p], *shown, *row.values()])
        text.flush()
        text.detach()

    with output_lock(output_path):
        atomic_write(output_path, write, what=f"--output {output_path}")
    return len(rows)
