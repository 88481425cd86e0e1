"""The fine-tuning LightningDataModule: a task's training and validation tables, encoded with
the pretrained encoder's tokenizer (``connect`` hands it over), in batches.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from bertpre.data.tokenizer import special_ids
from bertpre.errors import UserError
from bertpre.tasks.table import collate, encode_rows, pick_column, read_table, sample_rows


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
                            "(model.connect(data))")
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


