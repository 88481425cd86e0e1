"""The CJK ideographs, as BERT's tokenizer defines them (each one a word of its own): one definition
for the tokenizer's trainer, the Chinese sentence splitter and the word boundaries."""

from __future__ import annotations

RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))
CHARACTER_CLASS = "".join(f"{chr(low)}-{chr(high)}" for low, high in RANGES)  # for a regex's [...]


def is_cjk(character: str) -> bool:
    code = ord(character)
    return any(low <= code <= high for low, high in RANGES)
