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

from bertpre.data.cjk import is_cjk
from bertpre.data.tokenizer import continuation_pieces
from bertpre.errors import UserError

SEGMENTERS = ("rjieba",)


def chinese_characters(tokenizer: Tokenizer) -> np.ndarray:
    """(vocabulary size,) bool: True for the ids of single Chinese characters."""
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(vocab.values()) + 1, dtype=bool)
    table[[i for token, i in vocab.items() if len(token) == 1 and is_cjk(token)]] = True
    return table


def mostly_chinese(tokenizer: Tokenizer) -> bool:
    """Whether a vocabulary is mostly single Chinese characters (a Chinese corpus's)."""
    return chinese_characters(tokenizer).sum() > 0.5 * tokenizer.get_vocab_size()


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
        raise UserError("--word-segmenter rjieba needs the rjieba package, bertpre's zh extra: pip install 'bertpre[zh]' "
                        "(pip install -e '.[zh]' in a clone)") from None
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
        lengths = [len(word) for word in self._jieba.cut(sentence)]
        return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


class WordBoundaries:
    """Token ids of sentences with, per token, whether it continues the previous token's word."""

    def __init__(self, tokenizer: Tokenizer, options: WordOptions) -> None:
        self.tokenizer = tokenizer
        self.segmenter = WordSegmenter(options)
        self.piece = continuation_pieces(tokenizer)
        self.chinese = chinese_characters(tokenizer)  # a Chinese character outside the vocabulary ([UNK]) ends a word

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
        continues = self.piece[ids]
        chinese = self.chinese[ids]
        if np.count_nonzero(chinese[1:] & chinese[:-1]):  # two Chinese characters in a row: ask the segmenter
            word = self.segmenter.word_of_character(sentence)[np.array(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]]
            continues[1:] |= chinese[1:] & chinese[:-1] & (word[1:] == word[:-1])
        if len(continues):
            continues[0] = False
        return continues


def word_groups(continues: np.ndarray) -> np.ndarray:
    """The word index of each token, from the flags (a word starts where a token does not continue)."""
    return np.cumsum(~continues) - 1
