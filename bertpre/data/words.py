"""Word boundaries for whole-word masking of Chinese (BERT-wwm): which token continues the word of
the token before it.

BERT's tokenizer cuts Chinese into single characters, and a character is never a ``##`` piece, so
WordPiece alone cannot say where a Chinese word ends. With ``--word-segmenter rjieba`` (the
``bertpre[zh]`` extra), ``bertpre prepare`` segments every sentence into words and stores, per
token, whether it continues the previous token's word (column ``word_continues``): a Chinese
character continues when it lies in the same segmenter word as the character before it; any other
token continues when it is a ``##`` piece right after its word's start (English in the same text
keeps WordPiece's grouping). Masking reads the column and never segments again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bertpre.errors import UserError

SEGMENTERS = ("rjieba",)
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))


def is_cjk(character: str) -> bool:
    """A CJK ideograph: BERT's tokenizer makes each one a token of its own."""
    code = ord(character)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def mostly_chinese(tokenizer: Tokenizer) -> bool:
    """Whether a vocabulary is mostly single Chinese characters (a Chinese corpus's)."""
    vocab = tokenizer.get_vocab()
    return sum(len(token) == 1 and is_cjk(token) for token in vocab) > 0.5 * len(vocab)


@dataclass(frozen=True)
class WordOptions:
    segmenter: str | None = None  # None: WordPiece's ## grouping only, nothing stored
    user_dict: str | None = None  # the segmenter's own format: one "word [frequency] [tag]" a line

    def __post_init__(self) -> None:
        if self.segmenter is not None and self.segmenter not in SEGMENTERS:
            raise UserError(f"--word-segmenter must be one of {', '.join(SEGMENTERS)}, got {self.segmenter!r}")
        if self.user_dict is not None and self.segmenter is None:
            raise UserError("--user-dict needs --word-segmenter (the dictionary is the segmenter's)")
        if self.user_dict is not None and not Path(self.user_dict).is_file():
            raise UserError(f"--user-dict: {self.user_dict}: no such file")

    def to_json(self) -> dict:
        """The options, with the segmenter's version and the dictionary's digest: what made the boundaries."""
        record: dict = asdict(self)
        if self.segmenter is not None:
            record["version"] = segmenter_version(self.segmenter)
        if self.user_dict is not None:
            record["user_dict_sha256"] = hashlib.sha256(Path(self.user_dict).read_bytes()).hexdigest()
        return record


def _import_rjieba():
    try:
        import rjieba
    except ImportError:
        raise UserError("--word-segmenter rjieba needs the rjieba package: pip install 'bertpre[zh]'") from None
    return rjieba


def segmenter_version(name: str) -> str:
    from importlib.metadata import version

    assert name in SEGMENTERS
    _import_rjieba()
    return version(name)


class WordSegmenter:
    """Chinese words of a sentence, as the word index of each character."""

    def __init__(self, options: WordOptions) -> None:
        assert options.segmenter is not None
        self._jieba = _import_rjieba().Jieba()
        if options.user_dict is not None:
            self._load_user_dict(Path(options.user_dict))

    def _load_user_dict(self, path: Path) -> None:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--user-dict: {path}: cannot read as UTF-8 text ({e})") from None
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 3 or (len(parts) >= 2 and not parts[1].isdigit()):
                raise UserError(f"--user-dict: {path}:{number}: expected 'word [frequency] [tag]', got {line.strip()!r}")
            self._jieba.add_word(parts[0], int(parts[1]) if len(parts) >= 2 else None,
                                 parts[2] if len(parts) == 3 else None)

    def word_of_character(self, sentence: str) -> np.ndarray:
        """(len(sentence),) int32: the index of the segmenter word each character belongs to."""
        words = np.empty(len(sentence), dtype=np.int32)
        for index, (_, start, end) in enumerate(self._jieba.tokenize(sentence)):
            words[start:end] = index
        return words


class WordBoundaries:
    """Token ids of sentences with, per token, whether it continues the previous token's word."""

    def __init__(self, tokenizer: Tokenizer, options: WordOptions) -> None:
        self.tokenizer = tokenizer
        self.segmenter = WordSegmenter(options)
        vocab = tokenizer.get_vocab()
        self.piece = np.zeros(max(vocab.values()) + 1, dtype=bool)
        self.piece[[i for token, i in vocab.items() if token.startswith("##")]] = True

    def encode(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids back to back as int32, ids per sentence as int64, continues-the-word flags as bool)."""
        encodings = self.tokenizer.encode_batch(list(sentences), add_special_tokens=False)
        ids, counts, flags = [], np.zeros(len(encodings), dtype=np.int64), []
        for n, (sentence, encoding) in enumerate(zip(sentences, encodings)):
            token_ids = np.asarray(encoding.ids, dtype=np.int32)
            counts[n] = len(token_ids)
            ids.append(token_ids)
            flags.append(self._continues(sentence, token_ids, encoding.offsets))
        if not ids:
            return np.zeros(0, np.int32), counts, np.zeros(0, bool)
        return np.concatenate(ids), counts, np.concatenate(flags)

    def _continues(self, sentence: str, ids: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
        continues = self.piece[ids].copy()
        if len(ids) < 2:
            return np.zeros(len(ids), dtype=bool)
        starts = np.array([start for start, _ in offsets], dtype=np.int64)
        chinese = np.array([end - start == 1 and is_cjk(sentence[start]) for start, end in offsets])
        if chinese.sum() >= 2:
            word = self.segmenter.word_of_character(sentence)[starts]
            same_word = chinese[1:] & chinese[:-1] & (word[1:] == word[:-1])
            continues[1:] |= same_word
        continues[0] = False
        return continues


def word_groups(continues: np.ndarray) -> np.ndarray:
    """The word index of each token, from the flags (a word starts where a token does not continue)."""
    return np.cumsum(~continues) - 1
