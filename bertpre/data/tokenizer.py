"""BERT WordPiece tokenizer: train one on a corpus, or load a tokenizer.json / vocab.txt.

Every tokenizer bertpre hands out has the pair template ``[CLS] A [SEP] B [SEP]`` with
token types 0/1 set as its post-processor (a freshly trained WordPiece model has none).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bertpre.data.cjk import is_cjk
from bertpre.errors import UserError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # trained tokenizers get ids 0..4 in this order


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @property
    def all(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


def special_ids(tokenizer: Tokenizer, source: str = "tokenizer") -> SpecialIds:
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"{source}: vocabulary has no {token} token")
        ids[token] = token_id
    return SpecialIds(ids[PAD], ids[UNK], ids[CLS], ids[SEP], ids[MASK])


def _with_bert_pipeline(model: models.Model, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _set_pair_template(tokenizer: Tokenizer, source: str) -> Tokenizer:
    ids = special_ids(tokenizer, source)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, ids.cls), (SEP, ids.sep)],
    )
    return tokenizer


MAX_VOCAB_SIZE = 1 << 20


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary size that cannot work before any work starts."""
    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise UserError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + 100}, got {vocab_size}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"--vocab-size must be at most {MAX_VOCAB_SIZE}, got {vocab_size} (the WordPiece trainer's "
                        "memory grows with it; BERT vocabularies hold 30k-120k entries)")


def train_tokenizer(texts: Sequence[str], vocab_size: int = 30522, lowercase: bool = True) -> Tokenizer:
    """Train a BERT WordPiece vocabulary on ``texts``; the same texts give the same vocabulary.

    The trainer gives "##" continuation pieces ids in hash-map order, and those ids break
    ties between equally frequent merges, so the vocabulary varies from run to run
    (tokenizers issue #1794). Declaring every "##c" up front fixes their ids. They are
    declared as the trainer's special tokens, but the model is rebuilt from the plain
    vocabulary afterwards, so they end up as ordinary tokens.
    """
    check_vocab_size(vocab_size)
    tokenizer = _with_bert_pipeline(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100), lowercase)
    continuations = sorted("##" + c for c in normalized_characters(tokenizer, texts) if _inside_words(c))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS) + continuations,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    vocab = _canonical_order(tokenizer.get_vocab())
    tokenizer = _with_bert_pipeline(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100), lowercase)
    return _set_pair_template(tokenizer, "trained tokenizer")


def normalized_characters(tokenizer: Tokenizer, texts: Sequence[str]) -> set[str]:
    """The characters of ``texts`` after the tokenizer's BERT normalizer. It maps each character on
    its own (clean-up, spaces around CJK, NFD and accent stripping, lowercasing: no rule looks at a
    neighbour), so the distinct characters are normalised once, not the whole text (4 s of 8 in
    training a tokenizer on 10 MB)."""
    raw: set[str] = set()
    for text in texts:
        raw.update(text)
    return set(tokenizer.normalizer.normalize_str("\n".join(sorted(raw))))


def _inside_words(c: str) -> bool:
    """Can ``c`` follow another character inside a word after BERT's pre-tokenizer?"""
    if c.isspace() or unicodedata.category(c).startswith(("P", "C")):
        return False
    code = ord(c)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return False  # BERT treats all ASCII symbols as punctuation
    return not is_cjk(c)  # CJK ideographs are words of their own


def continuation_pieces(tokenizer: Tokenizer) -> np.ndarray:
    """(vocabulary size,) bool: True for the ids of ``##`` pieces, which continue the word before them."""
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(vocab.values()) + 1, dtype=bool)
    table[[i for token, i in vocab.items() if token.startswith("##")]] = True
    return table


def _canonical_order(vocab: dict[str, int]) -> dict[str, int]:
    """Renumber a trained vocabulary so that ids do not depend on hash order.

    The trainer emits its initial alphabet in hash-map order, so the same corpus gives the
    same tokens under different ids from run to run. Order: special tokens, the sorted
    single characters (with and without "##"), then the learned pieces in learned order.
    """
    def is_char(token: str) -> bool:
        return len(token.removeprefix("##")) == 1

    by_id = sorted(vocab, key=vocab.__getitem__)
    rest = [t for t in by_id if t not in SPECIAL_TOKENS]
    ordered = list(SPECIAL_TOKENS) + sorted(t for t in rest if is_char(t)) + [t for t in rest if not is_char(t)]
    return {token: i for i, token in enumerate(ordered)}


def load_tokenizer(path: str | Path, lowercase: bool = True) -> Tokenizer:
    """Load a tokenizer.json, a vocab.txt, or a folder holding either (e.g. a prepare output).

    ``lowercase`` applies to a vocab.txt only; a tokenizer.json carries its own normalizer.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UserError(f"--tokenizer {path}: folder has no tokenizer.json or vocab.txt")
    if not path.is_file():
        raise UserError(f"--tokenizer {path}: not found")
    if path.suffix == ".json":
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"--tokenizer {path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
    else:
        try:
            vocab = _read_vocab_txt(path)
        except UnicodeDecodeError:
            raise UserError(f"--tokenizer {path}: not a vocab.txt (not UTF-8 text)") from None
        model = models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=100)
        tokenizer = _with_bert_pipeline(model, lowercase)
    return _set_pair_template(tokenizer, f"--tokenizer {path}")


def _read_vocab_txt(path: Path) -> dict[str, int]:
    tokens = path.read_text(encoding="utf-8").splitlines()
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    if not vocab or len(vocab) != len(tokens):
        raise UserError(f"--tokenizer {path}: not a vocab.txt (empty or duplicate entries)")
    return vocab


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """Write tokenizer.json and vocab.txt (one token per line, in id order)."""
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    (directory / "vocab.txt").write_text("".join(token + "\n" for token in ordered), encoding="utf-8")


def vocab_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the vocabulary (tokens and ids) and the normalizer: equal iff ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    normalizer = json.loads(tokenizer.to_str()).get("normalizer")
    payload = json.dumps({"vocab": vocab, "normalizer": normalizer}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# Whitespace to Python and Arrow, but control characters that BERT's normalizer deletes:
# removed before splitting into words (tests check this list against the tokenizer).
_DELETED_WHITESPACE = re.compile("[\x0b\x0c\x1c-\x1f\x85]")


def word_cacheable(tokenizer: Tokenizer) -> bool:
    """Whether encoding whitespace-separated words one by one gives the same ids as encoding
    the sentence: true for BERT's normalizer (with clean_text) and pre-tokenizer, which never
    join or split across whitespace, when no added token contains whitespace."""
    config = json.loads(tokenizer.to_str())
    normalizer, pre_tokenizer = config.get("normalizer"), config.get("pre_tokenizer")
    if normalizer is None or normalizer.get("type") != "BertNormalizer" or not normalizer.get("clean_text"):
        return False
    if pre_tokenizer is None or pre_tokenizer.get("type") != "BertPreTokenizer":
        return False
    return not any(any(c.isspace() for c in t["content"]) for t in config.get("added_tokens", []))


class SentenceEncoder:
    """Token ids of many sentences at once, without special tokens.

    For BERT-style tokenizers (``word_cacheable``) each distinct word is tokenized once and
    kept in a cache, so the cost grows with the number of distinct words rather than with the
    text; splitting and hashing run in Arrow's C++ kernels. The ids equal
    ``tokenizer.encode``'s. The cache is emptied when it holds ``max_cached_chars``
    characters of words, which bounds its memory.
    """

    def __init__(self, tokenizer: Tokenizer, max_cached_chars: int = 32_000_000) -> None:
        self.tokenizer = tokenizer
        self.cached = word_cacheable(tokenizer)
        self.max_cached_chars = max_cached_chars
        self._clear()

    def _clear(self) -> None:
        self.index: dict[str, int] = {}
        self.cached_chars = 0
        self.pieces = np.zeros(1 << 16, dtype=np.int32)  # ids of all cached words, back to back
        self.starts = np.zeros(1 << 12, dtype=np.int64)
        self.lengths = np.zeros(1 << 12, dtype=np.int64)
        self.used = 0  # entries of self.pieces in use

    def encode(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all sentences back to back as int32, number of ids per sentence as int64)."""
        if not self.cached:
            return _flatten(self.tokenizer.encode_batch_fast(list(sentences), add_special_tokens=False))
        import pyarrow as pa
        import pyarrow.compute as pc

        text = pa.array(sentences, type=pa.large_string())
        if len(text) and pc.any(pc.match_substring_regex(text, _DELETED_WHITESPACE.pattern)).as_py():
            text = pc.replace_substring_regex(text, _DELETED_WHITESPACE.pattern, "")
        split = pc.utf8_split_whitespace(text)
        word_counts = pc.list_value_length(split).to_numpy(zero_copy_only=False).astype(np.int64)
        encoded = pc.dictionary_encode(pc.list_flatten(split))
        distinct = encoded.dictionary.to_pylist()
        if self.cached_chars > self.max_cached_chars:
            self._clear()
        get = self.index.get
        keys = np.fromiter((get(w, -1) for w in distinct), np.int64, len(distinct))
        missing = np.flatnonzero(keys < 0)
        if len(missing):
            self._add([distinct[i] for i in missing])
            keys[missing] = np.arange(len(self.index) - len(missing), len(self.index))
        keys = keys[encoded.indices.to_numpy(zero_copy_only=False)]
        lengths = self.lengths[keys]
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        positions = np.repeat(self.starts[keys] - (ends - lengths), lengths) + np.arange(total)
        sentence_of_word = np.repeat(np.arange(len(word_counts)), word_counts)
        counts = np.bincount(sentence_of_word, weights=lengths, minlength=len(word_counts)).astype(np.int64)
        return self.pieces[positions], counts

    def _add(self, words: list[str]) -> None:
        ids, lengths = self._encode_words(words)
        first = len(self.index)
        self.pieces = _fit(self.pieces, self.used + len(ids))
        self.starts, self.lengths = _fit(self.starts, first + len(words)), _fit(self.lengths, first + len(words))
        self.pieces[self.used : self.used + len(ids)] = ids
        self.starts[first : first + len(words)] = self.used + np.cumsum(lengths) - lengths
        self.lengths[first : first + len(words)] = lengths
        self.used += len(ids)
        self.index.update(zip(words, range(first, first + len(words))))
        self.cached_chars += sum(map(len, words))


    def _encode_words(self, words: list[str], group: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """Ids of each word (which holds no whitespace), words encoded ``group`` at a time as one
        space-joined text (half the cost of one encoding per word); tokens go back to their
        word by character offset."""
        groups = [words[i : i + group] for i in range(0, len(words), group)]
        encodings = self.tokenizer.encode_batch([" ".join(g) for g in groups], add_special_tokens=False)
        all_ids, all_lengths = [], []
        for chunk, encoding in zip(groups, encodings):
            sizes = np.fromiter(map(len, chunk), np.int64, len(chunk))
            word_starts = np.cumsum(sizes + 1) - sizes - 1
            token_starts = np.fromiter((start for start, _ in encoding.offsets), np.int64, len(encoding.offsets))
            word_of_token = np.searchsorted(word_starts, token_starts, side="right") - 1
            all_ids.append(np.array(encoding.ids, dtype=np.int32))
            all_lengths.append(np.bincount(word_of_token, minlength=len(chunk)).astype(np.int64))
        return np.concatenate(all_ids), np.concatenate(all_lengths)


def _flatten(encodings) -> tuple[np.ndarray, np.ndarray]:
    counts = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, int(counts.sum()))
    return ids, counts


def _fit(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` grown (doubling) to hold at least ``size`` entries."""
    if size <= len(array):
        return array
    grown = np.zeros(max(size, 2 * len(array)), dtype=array.dtype)
    grown[: len(array)] = array
    return grown
