"""Tokenized documents -> training sequences for the sentence objective chosen
(``PairOptions.objective``):

- ``nsp`` (BERT): sentence pairs for next-sentence prediction, below.
- ``sop`` (ALBERT's sentence-order prediction): segment A and segment B are consecutive runs of
  sentences of one document, cut as ``nsp`` cuts A and B, swapped with probability 1/2 (label 1 =
  swapped); never a partner from another document. A chunk needs two sentences: it grows past its
  target length until it has them, and a document's last lone sentence, like a one-sentence
  document, makes no pair (counted as unpaired text).
- ``none`` (RoBERTa's FULL-SENTENCES): one segment, the block's sentences laid end to end and
  cut into sequences of the maximum length, continuing into the next document after a [SEP];
  no sentence label. The short-sequence probability applies only when set.

For ``nsp``:

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
OBJECTIVES = ("nsp", "sop", "none")
DEFAULT_SHORT_SEQ_PROB = 0.1  # for nsp and sop (Google's); none packs full sequences unless told otherwise


@dataclass(frozen=True)
class PairOptions:
    max_seq_length: int = 128
    short_seq_prob: float | None = None  # None: DEFAULT_SHORT_SEQ_PROB for nsp and sop, 0 for none
    nsp_probability: float = 0.5
    objective: str = "nsp"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.short_seq_prob is None:
            object.__setattr__(self, "short_seq_prob", 0.0 if self.objective == "none" else DEFAULT_SHORT_SEQ_PROB)
        if self.max_seq_length < MIN_SEQ_LENGTH:
            raise UserError(f"--max-seq-length must be at least {MIN_SEQ_LENGTH}, got {self.max_seq_length}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise UserError(f"--short-seq-prob must be in [0, 1], got {self.short_seq_prob}")
        if not 0.0 <= self.nsp_probability <= 1.0:
            raise UserError(f"--nsp-probability must be in [0, 1], got {self.nsp_probability}")

    @property
    def max_num_tokens(self) -> int:
        """Text tokens a sequence holds: room for [CLS] A [SEP] B [SEP], or [CLS] A [SEP] for none."""
        return self.max_seq_length - (2 if self.objective == "none" else 3)

    @property
    def has_sentence_label(self) -> bool:
        return self.objective != "none"


@dataclass
class Instance:
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    is_random_next: bool
    short_target: bool
    truncated: int  # tokens cut from A and B to fit max_seq_length
    corpus_tokens: int = 0  # tokens of A, and of B when B follows A, before the cut: the corpus text used
    dropped: int = 0  # of those, tokens cut (a random B is a copy from elsewhere: cutting it loses no text)
    # is_random_next is the sentence label: NotNext for nsp, swapped for sop, unused for none (B is empty)


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


def create_instances(documents: Sequence[Document], options: PairOptions, rng: random.Random,
                     sep_id: int = -1) -> Iterator[Instance]:
    """The objective's sequences from every document of ``documents``; NotNext partners are drawn
    from the same list, and ``none`` joins its documents with ``sep_id``.

    Documents must be non-empty and contain no empty sentences.
    """
    if options.objective == "none":
        assert sep_id >= 0, "none joins documents with [SEP]: pass sep_id"
        yield from packed_sequences(documents, options, rng, sep_id)
        return
    balance = NotNextBalance(options.nsp_probability)
    for index in range(len(documents)):
        if options.objective == "sop":
            yield from sop_instances_from_document(documents[index], options, rng)
        else:
            yield from instances_from_document(documents, index, options, rng, balance)


def sop_instances_from_document(document: Document, options: PairOptions, rng: random.Random) -> Iterator[Instance]:
    """Sentence-order pairs: chunks cut as for NSP, but only of two or more sentences (a chunk
    that reaches its target with one sentence takes the next as well); A and B are the chunk's
    two parts, in order or swapped with probability 1/2. A lone last sentence makes no pair."""
    target, short = _draw_target(options, rng)
    chunk: list[np.ndarray] = []
    length = 0
    for i, sentence in enumerate(document):
        chunk.append(sentence)
        length += len(sentence)
        if len(chunk) >= 2 and (i == len(document) - 1 or length >= target):
            a_end = rng.randint(1, len(chunk) - 1)
            tokens_a, tokens_b = np.concatenate(chunk[:a_end]), np.concatenate(chunk[a_end:])
            swapped = rng.random() < 0.5
            # Google's cut takes the odd token from B, so a cut pair in order would have A one token longer
            # than B: a length cue to the label. Here either side is "B" for the cut with probability 1/2.
            if rng.random() < 0.5:
                keep_a, keep_b = truncate_pair(len(tokens_a), len(tokens_b), options.max_num_tokens, rng)
            else:
                keep_b, keep_a = truncate_pair(len(tokens_b), len(tokens_a), options.max_num_tokens, rng)
            truncated = max(0, len(tokens_a) + len(tokens_b) - options.max_num_tokens)
            tokens_a, tokens_b = tokens_a[keep_a], tokens_b[keep_b]
            if swapped:
                tokens_a, tokens_b = tokens_b, tokens_a
            yield Instance(tokens_a, tokens_b, swapped, short, truncated, length, truncated)
            chunk, length = [], 0
            target, short = _draw_target(options, rng)


def packed_sequences(documents: Sequence[Document], options: PairOptions, rng: random.Random,
                     sep_id: int) -> Iterator[Instance]:
    """One-segment sequences: every sentence of ``documents`` in order, a [SEP] between two
    documents, cut every ``max_num_tokens`` tokens (or at a short target, drawn with
    ``short_seq_prob``); a sentence that crosses a cut continues the next sequence, so no text is
    lost and only the last sequence is shorter. No sequence starts with a separator."""
    parts: list[np.ndarray] = []
    for index, document in enumerate(documents):
        if index:
            parts.append(np.array([-1], dtype=np.int64))  # the separator, marked until the cut
        parts.extend(np.asarray(s, dtype=np.int64) for s in document)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    at = 0
    while at < len(flat):
        if flat[at] == -1:  # a document boundary at a cut: the next sequence starts with the new document
            at += 1
            continue
        target, short = _draw_target(options, rng)
        piece = flat[at : at + target]
        at += len(piece)
        text = int(np.count_nonzero(piece >= 0))
        tokens = np.where(piece >= 0, piece, sep_id).astype(np.int32)
        yield Instance(tokens, np.zeros(0, np.int32), False, short, 0, text)


def encode_instance(instance: Instance, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` and its token types (0 up to the first [SEP], 1 after); a
    one-segment sequence (``none``: B empty) is ``[CLS] A [SEP]``, token type 0 throughout."""
    len_a, len_b = len(instance.tokens_a), len(instance.tokens_b)
    if len_b == 0:
        input_ids = np.empty(len_a + 2, dtype=np.int32)
        input_ids[0], input_ids[1 : 1 + len_a], input_ids[-1] = cls_id, instance.tokens_a, sep_id
        return input_ids, np.zeros(len(input_ids), dtype=np.int8)
    input_ids = np.empty(len_a + len_b + 3, dtype=np.int32)
    input_ids[0] = cls_id
    input_ids[1 : 1 + len_a] = instance.tokens_a
    input_ids[1 + len_a] = sep_id
    input_ids[2 + len_a : 2 + len_a + len_b] = instance.tokens_b
    input_ids[-1] = sep_id
    token_type_ids = np.zeros(len(input_ids), dtype=np.int8)
    token_type_ids[2 + len_a :] = 1
    return input_ids, token_type_ids
