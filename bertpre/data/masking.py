"""Masked-LM masking and the batch collator.

Per sequence, ``min(max_predictions, max(1, round(len * mlm_probability)))`` positions are chosen
(``len`` counts [CLS] and [SEP], as Google does) among all tokens but [CLS], [SEP] and
[PAD]. Of those, 80% become [MASK], 10% a random non-special token, 10% stay as they
are. With whole-word masking a word's tokens are chosen together: its ``##`` pieces, or, in data
prepared with a word segmenter (a ``word_continues`` column, bertpre.data.words), the characters of
a Chinese word; each token still gets its own 80/10/10 draw. With n-gram masking (MacBERT, Cui et al.
2020), a chosen unit (a word with whole-word masking, a token without) brings up to ``max_ngram - 1``
units after it into one masked span: span length n is drawn with weight ``max_ngram + 1 - n`` (40/30/20/10%
for n = 1..4), and a span stops early at a gap ([SEP], an ineligible token), at a unit already
chosen, or where it would pass the budget. The budget and the per-token 80/10/10 stay as they are.

Batches use HuggingFace's keys, so one can be given to transformers' BertForPreTraining;
they also carry Google's fixed prediction slots: ``mlm_positions`` (B, P) and ``mlm_labels``
(B, P), P = ``max_predictions`` for every batch, empty slots at position 0 with label
IGNORE_INDEX. The model gathers P hidden states per sequence, a shape that does not depend
on the data (no ``nonzero``, no host sync, nothing for torch.compile to recompile).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from bertpre.data.tokenizer import SpecialIds, continuation_pieces, special_ids
from bertpre.data.words import word_groups
from bertpre.errors import UserError

if TYPE_CHECKING:  # torch is imported where batches are made, so that `bertpre prepare` never loads it
    import torch

IGNORE_INDEX = -100
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1
MLM_PROBABILITY = 0.15  # BERT's share of tokens predicted
MAX_NGRAM = 8  # the longest n-gram span masking accepts (MacBERT uses 4)


def default_max_predictions(max_seq_length: int, mlm_probability: float = MLM_PROBABILITY) -> int:
    """Google's 20 predictions at length 128 and rate 0.15, scaled linearly in both (80 at 512; 53 at
    128 and 0.4): a cap that never binds below the rate asked for."""
    return max(1, round(20 * max_seq_length / 128 * mlm_probability / MLM_PROBABILITY))


def check_max_ngram(value: int, name: str = "max_ngram") -> None:
    if not 1 <= value <= MAX_NGRAM:
        raise UserError(f"{name} must be between 1 and {MAX_NGRAM}, got {value}")


@dataclass(frozen=True)
class Masker:
    special: SpecialIds
    random_pool: np.ndarray  # ids a "random token" replacement is drawn from (non-special)
    max_predictions: int
    mlm_probability: float = MLM_PROBABILITY
    continuation: np.ndarray | None = None  # bool per id: True for "##" pieces; enables whole-word masking
    max_ngram: int = 1  # longest span of consecutive units (words or tokens) masked together

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer, max_predictions: int, mlm_probability: float = MLM_PROBABILITY,
        whole_word: bool = False, max_ngram: int = 1,
    ) -> Masker:
        if not 0.0 < mlm_probability < 1.0:
            raise UserError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if max_predictions < 1:
            raise UserError(f"max_predictions must be at least 1, got {max_predictions}")
        check_max_ngram(max_ngram)
        special = special_ids(tokenizer)
        size = max(tokenizer.get_vocab().values()) + 1
        random_pool = np.setdiff1d(np.arange(size, dtype=np.int64), np.array(special.all))
        continuation = continuation_pieces(tokenizer) if whole_word else None
        return cls(special, random_pool, max_predictions, mlm_probability, continuation, max_ngram)

    def num_to_predict(self, length: int) -> int:
        return min(self.max_predictions, max(1, round(length * self.mlm_probability)))

    def choose_positions(self, ids: np.ndarray, rng: np.random.Generator,
                         word_continues: np.ndarray | None = None) -> np.ndarray:
        """Sorted positions to predict in one unpadded sequence. With whole-word masking, a token
        joins the word before it where ``word_continues`` (stored boundaries) says so, or, without
        them, where it is a ``##`` piece. With ``max_ngram`` > 1, spans of consecutive units."""
        eligible = (ids != self.special.cls) & (ids != self.special.sep) & (ids != self.special.pad)
        candidates = np.flatnonzero(eligible)
        n = min(self.num_to_predict(len(ids)), len(candidates))
        if self.continuation is None and self.max_ngram == 1:
            return np.sort(rng.choice(candidates, size=n, replace=False))
        if self.continuation is None:  # n-grams of single tokens
            continues = np.zeros(len(candidates), dtype=bool)
        else:  # whole words: a piece joins the group before it when it is a "##" piece right after it
            continues = (self.continuation[ids] if word_continues is None else word_continues.astype(bool))[candidates]
            continues[1:] &= np.diff(candidates) == 1
        if len(candidates):
            continues[0] = False
        group_of = word_groups(continues)
        starts = np.flatnonzero(~continues)
        lengths = np.diff(np.append(starts, len(candidates)))
        if self.max_ngram == 1:
            chosen: list[int] = []
            total = 0
            for group in rng.permutation(len(starts)):
                if total >= n:
                    break
                if total + lengths[group] > n:
                    continue
                chosen.append(group)
                total += lengths[group]
            return candidates[np.isin(group_of, chosen)]
        return candidates[self._ngram_groups(candidates, starts, lengths, n, rng)[group_of]]

    def _ngram_groups(self, candidates: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n: int,
                      rng: np.random.Generator) -> np.ndarray:
        """(groups,) bool: the units (groups of candidates) that n-gram spans cover, at most n tokens."""
        groups = len(starts)
        # follows[g]: group g + 1 starts right after group g ends (no [SEP] or other gap between them)
        follows = np.append(np.diff(candidates)[starts[1:] - 1] == 1, False)
        weights = np.arange(self.max_ngram, 0, -1, dtype=np.float64)
        spans = rng.choice(np.arange(1, self.max_ngram + 1), size=groups, p=weights / weights.sum())
        taken = np.zeros(groups, dtype=bool)
        total = 0
        for first, span in zip(rng.permutation(groups), spans):
            if total >= n:
                break
            if taken[first] or total + lengths[first] > n:
                continue
            last = first
            size = lengths[first]
            while (last - first + 1 < span and follows[last] and not taken[last + 1]
                   and total + size + lengths[last + 1] <= n):
                last += 1
                size += lengths[last]
            taken[first:last + 1] = True
            total += size
        return taken

    def apply(self, input_ids: np.ndarray, rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Mask ``input_ids[rows, cols]`` in place (80/10/10); returns the original ids there."""
        originals = input_ids[rows, cols].copy()
        draw = rng.random(len(rows))
        to_mask = draw < MASK_FRACTION
        to_random = (draw >= MASK_FRACTION) & (draw < MASK_FRACTION + RANDOM_FRACTION)
        input_ids[rows[to_mask], cols[to_mask]] = self.special.mask
        input_ids[rows[to_random], cols[to_random]] = rng.choice(self.random_pool, size=int(to_random.sum()))
        return originals


class MaskingCollator:
    """Pads a list of examples to the longest (optionally a multiple of ``pad_to_multiple_of``)
    and masks them afresh (dynamic masking), unless they carry stored masks (static masking).

    When examples carry a ``draw`` number (which row, in which epoch: see
    ``bertpre.data.datamodule.DrawNumbered``), a batch's masks are a function of ``seed`` and its draw
    numbers alone: new masks each epoch, yet the same in any process, in any loader worker,
    and after a resume. Otherwise they come from torch's generator.
    """

    def __init__(self, masker: Masker, pad_to_multiple_of: int | None = None, seed: int = 0) -> None:
        self.masker = masker
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed

    def generator(self, examples: Sequence[Mapping[str, object]], input_ids: np.ndarray) -> np.random.Generator:
        """The masking randomness for one padded batch."""
        if "draw" in examples[0]:
            return np.random.default_rng([self.seed, *(int(e["draw"]) for e in examples)])
        import torch

        return np.random.default_rng(int(torch.randint(0, 2**62, (1,))))

    def __call__(self, examples: Sequence[Mapping[str, object]]) -> dict[str, torch.Tensor]:
        import torch

        lengths = [len(e["input_ids"]) for e in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(examples)
        input_ids = np.full((batch, width), self.masker.special.pad, dtype=np.int64)
        token_type_ids = np.zeros((batch, width), dtype=np.int64)
        attention_mask = np.zeros((batch, width), dtype=np.int64)
        labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
        for row, (example, length) in enumerate(zip(examples, lengths)):
            input_ids[row, :length] = example["input_ids"]
            token_type_ids[row, :length] = example["token_type_ids"]
            attention_mask[row, :length] = 1
        if "masked_lm_positions" in examples[0]:
            for row, example in enumerate(examples):
                labels[row, np.asarray(example["masked_lm_positions"], dtype=np.int64)] = example["masked_lm_ids"]
        else:
            rng = self.generator(examples, input_ids)
            words = [np.asarray(e["word_continues"], dtype=bool) if "word_continues" in e else None for e in examples]
            chosen = [self.masker.choose_positions(input_ids[row, :length], rng, words[row])
                      for row, length in enumerate(lengths)]
            rows = np.repeat(np.arange(batch), [len(c) for c in chosen])
            cols = np.concatenate(chosen)
            labels[rows, cols] = self.masker.apply(input_ids, rows, cols, rng)
        positions, slot_labels = prediction_slots(labels, self.masker.max_predictions)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "mlm_positions": torch.from_numpy(positions),
            "mlm_labels": torch.from_numpy(slot_labels),
        }
        if "next_sentence_label" in examples[0]:  # nsp and sop data; none has no sentence label
            batch["next_sentence_label"] = torch.tensor([int(e["next_sentence_label"]) for e in examples],
                                                        dtype=torch.long)
        return batch


def prediction_slots(labels: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Google's ``masked_lm_positions`` / ``masked_lm_ids`` from dense labels (B, T): each row's
    predicted positions in order, then empty slots (position 0, label IGNORE_INDEX), (B, P) each.
    P is ``slots`` unless a row predicts more (stored masks of another rate): then that row's count."""
    predicted = labels != IGNORE_INDEX
    counts = predicted.sum(1)
    width = max(slots, int(counts.max(initial=0)))
    positions = np.zeros((len(labels), width), dtype=np.int64)
    slot_labels = np.full((len(labels), width), IGNORE_INDEX, dtype=np.int64)
    rows, cols = np.nonzero(predicted)  # row-major: each row's positions in order
    within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    positions[rows, within] = cols
    slot_labels[rows, within] = labels[rows, cols]
    return positions, slot_labels
