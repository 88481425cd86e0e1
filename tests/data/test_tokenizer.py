"""The tokenizer: training on a bounded sample, the cached word encoder equal to the tokenizer."""


import numpy as np
import pytest
from conftest import SHARED_DATA, WIKITEXT, gutenberg_books
from tokenizers import Tokenizer, pre_tokenizers

from bertpre.cli import main
from bertpre.data.corpus import CorpusOptions, CorpusStats, expand_inputs, read_documents
from bertpre.data.prepare import tokenizer_sample
from bertpre.data.tokenizer import (
    _DELETED_WHITESPACE,
    SentenceEncoder,
    load_tokenizer,
    normalized_characters,
    train_tokenizer,
    word_cacheable,
)

ODD_TEXT = [
    "a\x1cb c\u2028d e\x0bf\x85g h\x0ci Caf\u00e9 NA\u00cfVE \u4e2d\u6587\u5b57 x\u200by " + "z" * 150,
    "", "   ", "[MASK] hello[SEP]x", "\x00\ufffd a\ufffdb", "tab\tsep\u3000ideographic\u00a0nbsp",
    "it's (quoted) \"words\" -- dashes... and 3.14 numbers!",
]


def direct_ids(tokenizer: Tokenizer, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
    ids = np.array([i for e in encodings for i in e.ids], dtype=np.int32)
    return ids, np.array([len(e.ids) for e in encodings])


@pytest.fixture(scope="module")
def book_sentences() -> list[str]:
    """The sentences of four Gutenberg books."""
    return [s for d in read_documents(expand_inputs(gutenberg_books()[:4]), CorpusOptions(), CorpusStats()) for s in d]


@pytest.mark.parametrize("cased", [False, True])
def test_word_cache_gives_the_tokenizers_ids(book_sentences, cased):
    wikitext = [line.strip() for line in (WIKITEXT / "valid.txt").read_text(encoding="utf-8").splitlines()]
    tokenizer = train_tokenizer(book_sentences[:20000], 4000, lowercase=not cased)
    sentences = book_sentences + wikitext + ODD_TEXT
    encoder = SentenceEncoder(tokenizer)
    assert encoder.cached
    expected_ids, expected_counts = direct_ids(tokenizer, sentences)
    for _ in range(2):  # a cold and a warm cache
        ids, counts = encoder.encode(sentences)
        assert np.array_equal(counts, expected_counts) and np.array_equal(ids, expected_ids)
    small = SentenceEncoder(tokenizer, max_cached_chars=1000)  # emptied again and again
    for start in range(0, 3000, 500):
        ids, counts = small.encode(sentences[start : start + 500])
        assert np.array_equal(ids, direct_ids(tokenizer, sentences[start : start + 500])[0])


@pytest.mark.parametrize("cased", [False, True])
def test_the_characters_a_tokenizer_declares_are_those_of_the_normalised_text(book_sentences, cased):
    """Normalising each distinct character alone gives the characters of the normalised text: real
    English and Chinese text, Wikipedia's, and characters with accents, combining marks, a Greek
    final sigma, controls and odd spaces."""
    chinese = (SHARED_DATA / "corpora" / "chinese-novels" / "红楼梦.txt").read_text(encoding="utf-8")[:100_000]
    wikitext = (WIKITEXT / "valid.txt").read_text(encoding="utf-8").splitlines()[:1000]
    texts = book_sentences[:10_000] + wikitext + chinese.splitlines() + ODD_TEXT + [
        "ΟΔΥΣΣΕΥΣ Ὀδυσσεύς e\u0301 A\u030a\u0323"]
    tokenizer = train_tokenizer(texts[:200], 300, lowercase=not cased)  # only its normalizer counts here
    whole = set()
    for start in range(0, len(texts), 10_000):
        whole.update(tokenizer.normalizer.normalize_str("\n".join(texts[start : start + 10_000])))
    assert normalized_characters(tokenizer, texts) == whole
    assert len(whole) > 2000  # the Chinese novel's characters among them


def test_words_are_split_only_where_the_tokenizer_splits(gutenberg_prepared):
    tokenizer = load_tokenizer(gutenberg_prepared)
    whitespace = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and chr(c).isspace()]
    deleted = {c for c in whitespace
               if len(tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(f"a{c}b"))) != 2}
    assert deleted == {c for c in whitespace if _DELETED_WHITESPACE.fullmatch(c)}


def test_other_tokenizers_are_encoded_sentence_by_sentence(gutenberg_prepared):
    tokenizer = load_tokenizer(gutenberg_prepared)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.Digits()])
    encoder = SentenceEncoder(tokenizer)
    assert not word_cacheable(tokenizer) and not encoder.cached
    ids, counts = encoder.encode(ODD_TEXT)
    expected_ids, expected_counts = direct_ids(tokenizer, ODD_TEXT)
    assert np.array_equal(ids, expected_ids) and np.array_equal(counts, expected_counts)


@pytest.mark.slow  # three samples of 6 MB and a tokenizer, 11 s here; in CI's slow run
def test_tokenizer_sample_is_bounded_seeded_and_trainable_alone(tmp_path, capsys):
    books = expand_inputs([b for b in gutenberg_books() if "bible" not in b])  # 14 books, 6 MB
    options = CorpusOptions()
    sample = tokenizer_sample(books, options, sample_mb=1.0, seed=1)
    assert sample == tokenizer_sample(books, options, sample_mb=1.0, seed=1)
    assert sample != tokenizer_sample(books, options, sample_mb=1.0, seed=2)
    largest_document = max(sum(map(len, d)) for d in read_documents(books, options, CorpusStats()))
    assert 800_000 < sum(map(len, sample)) < 1_000_000 + largest_document
    assert len({s[:20] for s in sample[:100]}) > 50, "a spread of sentences, not one run"
    main(["tokenizer", "--input", *map(str, books), "--output", str(tmp_path / "tok"), "--vocab-size", "3000",
          "--tokenizer-sample-mb", "2"])
    assert "sample" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tok").get_vocab_size() == 3000
