"""A paragraph -> its sentences, for English-like text and for Chinese.

Text without Chinese characters or Chinese sentence punctuation goes to blingfire's sentence
splitter unchanged. Chinese text is split first by the Chinese rules, as the Chinese BERT
pipelines do: a sentence ends after 。！？ (and their ASCII forms after a Chinese character), or
after an ellipsis (…, ……), together with the closing quotes and brackets that follow
(”’」』）》】 and ASCII ")" and quotes), so 他说：“好。”然后走了。 is two sentences and the closing ”
stays with the first. Each piece that still holds Latin text is then split by blingfire (mixed
Chinese-English text keeps English sentence splitting), and a piece blingfire starts with a
closing mark is joined back to the one before.
"""

from __future__ import annotations

import re

import blingfire

from bertpre.data.cjk import CHARACTER_CLASS

_CJK = CHARACTER_CLASS
_CHINESE = re.compile(f"[{_CJK}\u3000-\u303f\uff01-\uff5e\u2026]")  # ideographs, CJK and full-width punctuation
_CLOSING = "\u201d\u2019\u300d\u300f\uff09\u300b\u3011\"')"
# a sentence end: Chinese terminal marks, an ellipsis, or ASCII !? right after a Chinese character; then closers
_CHINESE_END = re.compile(f"(?:[\u3002\uff01\uff1f]+|\u2026+|(?<=[{_CJK}])[!?]+)[{re.escape(_CLOSING)}]*")
_LATIN = re.compile("[A-Za-z]")
_CJK_LINE_BREAK = re.compile(f"(?<=[{_CJK}])[ \t]*\n\\s*(?=[{_CJK}])")  # wrapped Chinese text: no space


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph (wrapped lines allowed) -> its sentences."""
    text = " ".join(paragraph.split())
    if not text:
        return []
    if not _CHINESE.search(text):
        return _blingfire(text)
    text = " ".join(_CJK_LINE_BREAK.sub("", paragraph).split())
    sentences: list[str] = []
    for piece in _chinese_pieces(text):
        for sentence in (_blingfire(piece) if _LATIN.search(piece) else [piece]):
            if sentences and sentence[0] in _CLOSING:
                sentences[-1] += sentence
            else:
                sentences.append(sentence)
    return sentences


def _chinese_pieces(text: str) -> list[str]:
    pieces, start = [], 0
    for end in _CHINESE_END.finditer(text):
        pieces.append(text[start : end.end()].strip())
        start = end.end()
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def _blingfire(text: str) -> list[str]:
    return [s for s in blingfire.text_to_sentences(text).split("\n") if s.strip()]
