"""Tokenized documents -> sentence pairs for next-sentence prediction.

This follows Google BERT's ``create_instances_from_document`` rule for rule (soft target
length, chunking, ``a_end``, NotNext from another document with put-back, truncation of
the longer side from a random end), with two deliberate differences:

- The short target (probability ``short_seq_prob``) is drawn for every chunk, not once
  per document. Google's documents are Wikipedia articles; with book-length documents a
  per-document draw makes whole books short or long, so the short-pair share would swing
  with the corpus instead of being ``short_seq_prob``.
- The NotNext share is held at ``nsp_probability`` (0.5). Google always makes a
  one-sentence chunk NotNext and draws 0.5 for the others, so its share overshoots (53.4%
  on the gutenberg corpus, 64% among short-target pairs), and the label leaks through the
  length. One-sentence chunks are still always NotNext here, but multi-sentence chunks
  draw NotNext with probability ``(p - f) / (1 - f)``, ``f`` being the running share of
  one-sentence chunks, so that the overall share is ``p``.

A document is a list of sentences, each a 1-D integer array of token ids (no specials).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from bertpre.errors import UserError

Document = Sequence[np.ndarray]
MIN_SEQ_LENGTH = 8  # [CLS] A [SEP] B [SEP] needs room for a few tokens on each side


@dataclass(frozen=True)
class PairOptions:
    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    nsp_probability: float = 0.5

    def __post_init__(self) -> None:
        if self.max_seq_length < MIN_SEQ_LENGTH:
            raise UserError(f"--max-seq-length must be at least {MIN_SEQ_LENGTH}, got {self.max_seq_length}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise UserError(f"--short-seq-prob must be in [0, 1], got {self.short_seq_prob}")
        if not 0.0 <= self.nsp_probability <= 1.0:
            raise UserError(f"--nsp-probability must be in [0, 1], got {self.nsp_probability}")

    @property
    def max_num_tokens(self) -> int:
        return self.max_seq_length - 3  # room for [CLS], [SEP], [SEP]


@dataclass
class Instance:
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    is_random_next: bool
    short_target: bool
    truncated: int  # tokens cut from A and B to fit max_seq_length
    corpus_tokens: int = 0  # tokens of A, and of B when B follows A, before the cut: the corpus text used
    dropped: int = 0  # of those, tokens cut (a random B is a copy from elsewhere: cutting it loses no text)


def truncate_pair(len_a: int, len_b: int, max_tokens: int, rng: random.Random) -> tuple[slice, slice]:
    """Google's truncation: while too long, cut one token from the longer side (B when equal),
    at the front or the back with probability 1/2 each. Returns the kept slices of A and B.

    The loop is solved in closed form: the longer side is cut down to the shorter, then the
    cuts alternate B, A, B, ...; each side's front cuts are Binomial(cuts, 1/2).
    """
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return slice(0, len_a), slice(0, len_b)
    first = min(excess, abs(len_a - len_b))
    cut_a = first if len_a > len_b else 0
    cut_b = first if len_b > len_a else 0
    rest = excess - first
    cut_b += (rest + 1) // 2
    cut_a += rest // 2
    front_a = bin(rng.getrandbits(cut_a)).count("1") if cut_a else 0
    front_b = bin(rng.getrandbits(cut_b)).count("1") if cut_b else 0
    return slice(front_a, len_a - (cut_a - front_a)), slice(front_b, len_b - (cut_b - front_b))


def _draw_target(options: PairOptions, rng: random.Random) -> tuple[int, bool]:
    if rng.random() < options.short_seq_prob:
        return rng.randint(2, options.max_num_tokens), True
    return options.max_num_tokens, False


class NotNextBalance:
    """Probability of NotNext for a multi-sentence chunk that keeps the overall share at ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.chunks = 0
        self.single = 0

    def draw(self, chunk_sentences: int, rng: random.Random) -> bool:
        forced = min(self.single / self.chunks, self.p) if self.chunks else 0.0
        self.chunks += 1
        if chunk_sentences == 1:
            self.single += 1
            return True
        if self.p >= 1.0:
            return True
        return rng.random() < (self.p - forced) / (1.0 - forced)


def instances_from_document(
    documents: Sequence[Document], index: int, options: PairOptions, rng: random.Random, balance: NotNextBalance
) -> Iterator[Instance]:
    document = documents[index]
    target, short = _draw_target(options, rng)
    chunk: list[np.ndarray] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = np.concatenate(chunk[:a_end])
            is_random_next = balance.draw(len(chunk), rng)
            if is_random_next:
                tokens_b = _random_continuation(documents, index, target - len(tokens_a), rng)
                i -= len(chunk) - a_end  # put the unused sentences back
            else:
                tokens_b = np.concatenate(chunk[a_end:])
            keep_a, keep_b = truncate_pair(len(tokens_a), len(tokens_b), options.max_num_tokens, rng)
            truncated = max(0, len(tokens_a) + len(tokens_b) - options.max_num_tokens)
            corpus_tokens = len(tokens_a) + (0 if is_random_next else len(tokens_b))
            tokens_a, tokens_b = tokens_a[keep_a], tokens_b[keep_b]
            assert len(tokens_a) >= 1 and len(tokens_b) >= 1
            dropped = corpus_tokens - len(tokens_a) - (0 if is_random_next else len(tokens_b))
            yield Instance(tokens_a, tokens_b, is_random_next, short, truncated, corpus_tokens, dropped)
            chunk, length = [], 0
            target, short = _draw_target(options, rng)
        i += 1


def _random_continuation(documents: Sequence[Document], index: int, target_b: int, rng: random.Random) -> np.ndarray:
    """Sentences from a random start in another document until ``target_b`` tokens are reached.

    With a single document there is no other one to draw from, and (like Google) B then
    comes from a random place in the same document.
    """
    other = index
    for _ in range(10):
        other = rng.randint(0, len(documents) - 1)
        if other != index:
            break
    document = documents[other]
    taken: list[np.ndarray] = []
    total = 0
    for j in range(rng.randint(0, len(document) - 1), len(document)):
        taken.append(document[j])
        total += len(document[j])
        if total >= target_b:
            break
    return np.concatenate(taken)


def create_instances(documents: Sequence[Document], options: PairOptions, rng: random.Random) -> Iterator[Instance]:
    """Pairs from every document of ``documents``; NotNext partners are drawn from the same list.

    Documents must be non-empty and contain no empty sentences.
    """
    balance = NotNextBalance(options.nsp_probability)
    for index in range(len(documents)):
        yield from instances_from_document(documents, index, options, rng, balance)


def encode_instance(instance: Instance, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` and its token types (0 up to the first [SEP], 1 after)."""
    len_a, len_b = len(instance.tokens_a), len(instance.tokens_b)
    input_ids = np.empty(len_a + len_b + 3, dtype=np.int32)
    input_ids[0] = cls_id
    input_ids[1 : 1 + len_a] = instance.tokens_a
    input_ids[1 + len_a] = sep_id
    input_ids[2 + len_a : 2 + len_a + len_b] = instance.tokens_b
    input_ids[-1] = sep_id
    token_type_ids = np.zeros(len(input_ids), dtype=np.int8)
    token_type_ids[2 + len_a :] = 1
    return input_ids, token_type_ids
