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

from bertpre.data.masking import MLM_PROBABILITY, Masker, MaskingCollator, default_max_predictions
from bertpre.data.prepared import PreparedData
from bertpre.data.words import mostly_chinese
from bertpre.errors import UserError

HAS_PADDING = "has_padding"  # a host-side flag added to each batch before it moves to the device


class ContentSeededCollator(MaskingCollator):
    """Masks each batch with a seed derived from its token ids: the same batch, the same masks."""

    def generator(self, examples, input_ids: np.ndarray) -> np.random.Generator:
        return np.random.default_rng(zlib.crc32(input_ids.tobytes()))


class DrawNumbered(torch.utils.data.Dataset):
    """A dataset addressed by draw number ``epoch * len + row``: returns the row with its
    draw number, which seeds its masks (see MaskingCollator)."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, draw: int) -> dict:
        return self.__getitems__([draw])[0]

    def __getitems__(self, draws: list[int]) -> list[dict]:
        examples = self.rows.__getitems__([d % len(self.rows) for d in draws])
        for example, draw in zip(examples, draws):
            example["draw"] = draw
        return examples


class ResumableSampler(DistributedSampler):
    """The DistributedSampler's rows for this rank as draw numbers (epoch * len + row),
    optionally starting a number of batches into the epoch (after a resume)."""

    def __init__(self, dataset, batch_size: int, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size
        self.skip_batches = 0

    def __iter__(self):
        rows = list(super().__iter__())[self.skip_batches * self.batch_size :]
        self.skip_batches = 0  # only the first pass after a resume starts late
        offset = self.epoch * len(self.dataset)
        return iter([offset + row for row in rows])

    def resume(self, epoch: int, batches: int) -> None:
        self.set_epoch(epoch)
        self.skip_batches = batches


class ResumableLoader(DataLoader):
    """A training loader whose position (epoch, batches consumed) goes into checkpoints:
    Lightning saves ``state_dict()`` and calls ``load_state_dict()`` on resume, so a run
    resumed mid-epoch continues with the next unseen batch."""

    def __init__(self, *args, consumed, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = consumed  # () -> batches of the current epoch already trained on

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self.consumed()}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):  # saved at the end of an epoch
            epoch, batches = epoch + 1, 0
        self.sampler.resume(epoch, batches)


class PretrainDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        num_workers: int = 0,
        whole_word_masking: bool = False,
        mlm_probability: float = MLM_PROBABILITY,
        max_predictions: int | None = None,
        val_mlm_probability: float | None = MLM_PROBABILITY,
        pad_to_multiple_of: int | None = 8,
        val_whole_word_masking: bool | None = None,
        max_ngram: int = 1,
        val_max_ngram: int | None = 1,
    ) -> None:
        """
        Args:
            path: folder written by `bertpre prepare`
            batch_size: sequences per batch per device
            num_workers: DataLoader worker processes
            whole_word_masking: mask all tokens of a word together (dynamic masking only): a word's ## pieces,
                and in data prepared with --word-segmenter the characters of a Chinese word
            mlm_probability: share of tokens predicted per training sequence (BERT: 0.15; 0.3-0.4 give more
                targets per token, Wettig et al. 2023)
            max_predictions: cap on predicted tokens per sequence (default: 20 per 128 tokens at rate 0.15,
                scaled with the rate, so the cap never lowers the rate asked for)
            val_mlm_probability: share masked in validation; the default keeps BERT's 0.15 whatever the
                training rate, so val/mlm_accuracy compares across recipes (None: the training rate)
            pad_to_multiple_of: pad batches to a multiple of this length (None: to the longest)
            val_whole_word_masking: whole-word masking in validation (None: as in training); fix it to compare
                the validation accuracy of runs that mask differently
            max_ngram: n-gram masking (MacBERT): a chosen word (a token without whole-word masking) starts a
                span of up to this many consecutive ones, length n drawn with weight max_ngram + 1 - n
                (4: 40/30/20/10%); 1: each word or token alone, as BERT
            val_max_ngram: n-gram masking in validation; the default keeps single units whatever the
                training setting, so val/mlm_accuracy compares across recipes (None: as in training)
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
        self.val_mlm_probability = mlm_probability if val_mlm_probability is None else val_mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of
        self.val_whole_word_masking = whole_word_masking if val_whole_word_masking is None else val_whole_word_masking
        self.max_ngram = max_ngram
        self.val_max_ngram = max_ngram if val_max_ngram is None else val_max_ngram
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
        world = self.trainer.world_size if self.trainer else 1
        if stage == "fit" and len(self.splits["train"]) < self.batch_size * world:
            raise UserError(f"data.path {prepared.path}: the train split holds {len(self.splits['train'])} pairs, "
                            f"fewer than one batch (data.batch_size {self.batch_size} x {world} devices); lower "
                            "data.batch_size or prepare more text")
        seq = prepared.max_seq_length
        self.masker = Masker.from_tokenizer(
            prepared.tokenizer, self.max_predictions or default_max_predictions(seq, self.mlm_probability),
            self.mlm_probability, self.whole_word_masking, self.max_ngram,
        )
        self.val_masker = Masker.from_tokenizer(
            prepared.tokenizer, self.max_predictions or default_max_predictions(seq, self.val_mlm_probability),
            self.val_mlm_probability, self.val_whole_word_masking, self.val_max_ngram,
        )
        if (self.whole_word_masking and prepared.record.word_segmenter is None and mostly_chinese(prepared.tokenizer)
                and (self.trainer is None or self.trainer.is_global_zero)):
            print(f"warning: data.whole_word_masking: {prepared.path} stores no word boundaries, and Chinese "
                           "characters are never ## pieces, so its Chinese text is masked character by character; "
                           "prepare it with --word-segmenter rjieba for whole Chinese words", flush=True)

    def train_dataloader(self) -> DataLoader:
        """The sampler is always a DistributedSampler (one replica on a single process): with the
        same seed, N ranks of batch b see exactly the batches one process of batch N*b sees."""
        trainer = self.trainer
        sampler = ResumableSampler(
            self.splits["train"],
            batch_size=self.batch_size,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=True,
            seed=_seed(),
            drop_last=True,  # ranks disjoint; the < world_size tail is reshuffled next epoch
        )
        return ResumableLoader(
            DrawNumbered(self.splits["train"].with_format("numpy")),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=MaskingCollator(self.masker, self.pad_to_multiple_of, seed=_seed()),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            consumed=self._batches_consumed,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Note, while the batch is still on the host, whether it holds padding (a flag, no device
        sync): the model runs a batch without any with no attention mask."""
        if isinstance(batch, dict) and "attention_mask" in batch:
            batch[HAS_PADDING] = not bool(batch["attention_mask"].all())
        return batch

    def _batches_consumed(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def val_dataloader(self) -> DataLoader | list:
        if "validation" not in self.splits:  # prepare leaves out an empty split
            return []
        dataset = self.splits["validation"].with_format("numpy")
        trainer = self.trainer
        sampler = DistributedSampler(dataset, num_replicas=trainer.world_size if trainer else 1,
                                     rank=trainer.global_rank if trainer else 0, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=ContentSeededCollator(self.val_masker, self.pad_to_multiple_of),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


def _seed() -> int:
    """The run's seed (set by seed_everything), which the sampler and the masks derive from."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
