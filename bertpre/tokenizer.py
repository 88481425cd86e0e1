"""BERT WordPiece tokenizer: train one on a corpus, or load a tokenizer.json / vocab.txt.

Every tokenizer bertpre hands out has the pair template ``[CLS] A [SEP] B [SEP]`` with
token types 0/1 set as its post-processor (a freshly trained WordPiece model has none).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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


def train_tokenizer(texts: Sequence[str], vocab_size: int = 30522, lowercase: bool = True) -> Tokenizer:
    """Train a BERT WordPiece vocabulary on ``texts``; the same texts give the same vocabulary.

    The trainer gives "##" continuation pieces ids in hash-map order, and those ids break
    ties between equally frequent merges, so the vocabulary varies from run to run
    (tokenizers issue #1794). Declaring every "##c" up front fixes their ids. They are
    declared as the trainer's special tokens, but the model is rebuilt from the plain
    vocabulary afterwards, so they end up as ordinary tokens.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise UserError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + 100}, got {vocab_size}")
    tokenizer = _with_bert_pipeline(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100), lowercase)
    characters: set[str] = set()
    for start in range(0, len(texts), 10_000):
        characters.update(tokenizer.normalizer.normalize_str("\n".join(texts[start : start + 10_000])))
    continuations = sorted("##" + c for c in characters if _inside_words(c))
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


def _inside_words(c: str) -> bool:
    """Can ``c`` follow another character inside a word after BERT's pre-tokenizer?"""
    if c.isspace() or unicodedata.category(c).startswith(("P", "C")):
        return False
    code = ord(c)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return False  # BERT treats all ASCII symbols as punctuation
    return not (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF
                or 0x20000 <= code <= 0x2FA1F)  # CJK ideographs are words of their own


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
