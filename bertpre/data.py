"""LightningDataModule for a folder written by ``bertpre prepare``.

The Arrow dataset is memory-mapped (``load_from_disk``), read in whole batches, and
masked by ``MaskingCollator``. Validation batches are masked with a seed taken from their
content, so validation metrics do not move with the masking lottery.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, DistributedSampler

from bertpre.errors import UserError
from bertpre.masking import Masker, MaskingCollator, default_max_predictions
from bertpre.prepare import SCHEMA_VERSION
from bertpre.tokenizer import load_tokenizer, vocab_fingerprint


class PreparedData:
    """What training needs to know about a prepared folder: its tokenizer and its record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        record_path = self.path / "prepare.json"
        if not self.path.is_dir():
            raise UserError(f"data.path {self.path}: not found (run `bertpre prepare --output {self.path}` first)")
        if not record_path.is_file():
            raise UserError(f"data.path {self.path}: no prepare.json; not a folder written by `bertpre prepare`")
        try:
            self.record = json.loads(record_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{record_path}: not valid JSON ({e.msg})") from None
        version = self.record.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"data.path {self.path}: prepared with schema version {version}, this bertpre reads version "
                f"{SCHEMA_VERSION}; run `bertpre prepare` again"
            )
        self.tokenizer: Tokenizer = load_tokenizer(self.path / "tokenizer.json")
        self.fingerprint = vocab_fingerprint(self.tokenizer)
        self.max_seq_length: int = self.record["max_seq_length"]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def load_dataset(self):
        import datasets

        try:
            return datasets.load_from_disk(str(self.path / "dataset"))
        except FileNotFoundError as e:
            raise UserError(f"data.path {self.path}: dataset missing or incomplete ({e})") from None


class ContentSeededCollator(MaskingCollator):
    """Masks each batch with a seed derived from its token ids: the same batch, the same masks."""

    def generator(self, input_ids: np.ndarray) -> np.random.Generator:
        return np.random.default_rng(zlib.crc32(input_ids.tobytes()))


class PretrainDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        num_workers: int = 0,
        whole_word_masking: bool = False,
        mlm_probability: float = 0.15,
        max_predictions: int | None = None,
        pad_to_multiple_of: int | None = 8,
    ) -> None:
        """
        Args:
            path: folder written by `bertpre prepare`
            batch_size: sequences per batch per device
            num_workers: DataLoader worker processes
            whole_word_masking: mask all pieces of a word together (dynamic masking only)
            mlm_probability: share of tokens predicted per sequence
            max_predictions: cap on predicted tokens per sequence (default 20 per 128 tokens)
            pad_to_multiple_of: pad batches to a multiple of this length (None: to the longest)
        """
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.path = path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.whole_word_masking = whole_word_masking
        self.mlm_probability = mlm_probability
        self.max_predictions = max_predictions
        self.pad_to_multiple_of = pad_to_multiple_of
        self.prepared: PreparedData | None = None
        self.splits: Any = None

    def prepare(self) -> PreparedData:
        if self.prepared is None:
            self.prepared = PreparedData(self.path)
        return self.prepared

    def setup(self, stage: str) -> None:
        prepared = self.prepare()
        if self.splits is None:
            self.splits = prepared.load_dataset()
        max_predictions = self.max_predictions or default_max_predictions(prepared.max_seq_length)
        self.masker = Masker.from_tokenizer(
            prepared.tokenizer, max_predictions, self.mlm_probability, self.whole_word_masking
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", MaskingCollator(self.masker, self.pad_to_multiple_of), shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if "validation" not in self.splits:  # prepare leaves out an empty split
            return []
        return self._loader("validation", ContentSeededCollator(self.masker, self.pad_to_multiple_of), shuffle=False)

    def _loader(self, split: str, collator: MaskingCollator, shuffle: bool) -> DataLoader:
        """A loader whose sampler is always a DistributedSampler (one replica on a single process):
        with the same seed, N ranks of batch b see exactly the batches one process of batch N*b sees."""
        dataset = self.splits[split].with_format("numpy")
        trainer = self.trainer
        sampler = DistributedSampler(
            dataset,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=shuffle,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            drop_last=shuffle,  # training: ranks disjoint (the < world_size tail is reshuffled next epoch)
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=shuffle,
            collate_fn=collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
