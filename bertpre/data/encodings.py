"""Guessing the encoding of text that is not in the one it is read with, to name it in the refusal."""

from __future__ import annotations


def reads_as_text(head: bytes, encoding: str) -> bool:
    """Whether ``head`` decodes in ``encoding`` into text: mostly ASCII, spaces and CJK characters and
    punctuation (binary data decodes into characters from all over Unicode)."""
    text = head[: len(head) // 2 * 2].decode(encoding, errors="replace")
    usable = sum(c.isspace() or " " <= c <= "~" or "\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef"
                 for c in text)
    return usable >= 0.95 * max(len(text), 1)


def other_chinese_encoding(head: bytes) -> str | None:
    """gb18030 or big5 when ``head`` (minus a character the cut may have split) decodes as one of them
    into text that is mostly Chinese."""
    for name in ("gb18030", "big5"):
        for cut in range(4):
            try:
                text = head[: len(head) - cut].decode(name)
            except UnicodeDecodeError:
                continue
            cjk = sum("\u4e00" <= c <= "\u9fff" for c in text)
            if cjk >= 0.3 * sum(not c.isspace() for c in text):
                return name
            break
    return None
