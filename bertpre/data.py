"""LightningDataModule for a folder written by ``bertpre prepare``.

The Arrow files are memory-mapped (``PreparedData.load_dataset``), read in whole batches, and
masked by ``MaskingCollator``. Validation batches are masked with a seed taken from their
content, so validation metrics do not move with the masking lottery.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from bertpre.errors import UserError
from bertpre.masking import Masker, MaskingCollator, default_max_predictions
from bertpre.prepare import PreparedData


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
