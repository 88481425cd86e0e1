"""Raw text -> documents: find input files, detect their format, split prose into sentences.

A document is a list of sentences (strings). Three input formats are understood:

- ``lines``: one sentence per line, blank lines between documents (Google's format);
- ``prose``: wrapped lines with blank-line paragraphs; split into sentences here;
- ``jsonl``: one JSON object per line, one document each, its text in a configurable field.

Each file ends a document. A ``doc_separator`` regex makes any matching line (which is
dropped) start a new document, as WikiText's `` = Title = `` lines do.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import blingfire

from bertpre.errors import UserError

FORMATS = ("auto", "lines", "prose", "jsonl")
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_SNIFF_BYTES = 1 << 16
_TERMINAL = tuple('.!?"\')]\u201d\u2019:;')


class _InvalidByteCounter:
    """Codec error handler that replaces undecodable bytes with U+FFFD and counts them."""

    name = "bertpre-count-invalid"

    def __init__(self) -> None:
        self.count = 0
        codecs.register_error(self.name, self)

    def __call__(self, exc: UnicodeError) -> tuple[str, int]:
        assert isinstance(exc, UnicodeDecodeError)
        self.count += exc.end - exc.start
        return "\ufffd", exc.end


_invalid_bytes = _InvalidByteCounter()


@dataclass
class CorpusOptions:
    format: str = "auto"
    text_field: str = "text"
    doc_separator: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.doc_separator is not None:
            try:
                re.compile(self.doc_separator)
            except re.error as e:
                raise UserError(f"--doc-separator is not a valid regular expression: {e}") from None


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    sentences: int = 0
    input_bytes: int = 0
    invalid_utf8_bytes: int = 0
    formats: dict[str, str] = field(default_factory=dict)
    invalid_utf8_by_file: dict[str, int] = field(default_factory=dict)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively, hidden entries skipped) and glob patterns -> files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = [
                p for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            if not found:
                raise UserError(f"input folder {item} contains no files")
            files.extend(found)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise UserError(f"input not found: {item}")
            files.extend(matches)
    unique = list(dict.fromkeys(files))
    if not unique:
        raise UserError("no input files given")
    return unique


def _content_suffix(path: Path) -> str:
    """The suffix that says what the content is: 'a.jsonl.gz' -> '.jsonl'."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def _open_binary(path: Path) -> IO[bytes]:
    opener = _COMPRESSED.get(path.suffix.lower(), open)
    return opener(path, "rb")


def _open_text(path: Path) -> io.TextIOWrapper:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors=_invalid_bytes.name)


def _sniff(path: Path) -> str:
    try:
        with _open_binary(path) as f:
            head = f.read(_SNIFF_BYTES)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    if b"\x00" in head:
        raise UserError(f"{path}: binary file (contains NUL bytes), not text")
    return head.decode("utf-8", errors="replace")


def detect_format(path: Path, requested: str = "auto") -> str:
    """The explicit format if one was asked for, else guess from the extension and the content."""
    sample = _sniff(path)
    if requested != "auto":
        return requested
    if _content_suffix(path) in JSONL_SUFFIXES:
        return "jsonl"
    lines = sample.splitlines()
    if len(sample) == _SNIFF_BYTES and lines:
        lines = lines[:-1]  # the last line may be cut
    nonblank = [line.strip() for line in lines if line.strip()]
    if not nonblank:
        return "lines"
    if nonblank[0].startswith("{"):
        try:
            json.loads(nonblank[0])
            return "jsonl"
        except json.JSONDecodeError:
            pass
    terminal = sum(line.endswith(_TERMINAL) for line in nonblank) / len(nonblank)
    one_sentence = sum("\n" not in blingfire.text_to_sentences(line) for line in nonblank) / len(nonblank)
    return "lines" if terminal >= 0.5 and one_sentence >= 0.85 else "prose"


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph (wrapped lines allowed) -> its sentences."""
    text = " ".join(paragraph.split())
    if not text:
        return []
    return [s for s in blingfire.text_to_sentences(text).split("\n") if s.strip()]


def _read_lines(path: Path, separator: re.Pattern | None) -> Iterator[list[str]]:
    document: list[str] = []
    with _open_text(path) as f:
        for line in f:
            if separator is not None and separator.search(line):
                if document:
                    yield document
                document = []
                continue
            line = line.strip()
            if line:
                document.append(line)
            elif document:
                yield document
                document = []
    if document:
        yield document


def _read_prose(path: Path, separator: re.Pattern | None) -> Iterator[list[str]]:
    document: list[str] = []
    paragraph: list[str] = []
    with _open_text(path) as f:
        for line in f:
            if separator is not None and separator.search(line):
                document.extend(split_sentences(" ".join(paragraph)))
                paragraph = []
                if document:
                    yield document
                document = []
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                document.extend(split_sentences(" ".join(paragraph)))
                paragraph = []
    document.extend(split_sentences(" ".join(paragraph)))
    if document:
        yield document


def _read_jsonl(path: Path, text_field: str) -> Iterator[list[str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path}:{lineno}: no field {text_field!r} (set --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field {text_field!r} is not a string")
            document = [s for para in re.split(r"\n\s*\n", text) for s in split_sentences(para)]
            if document:
                yield document


def read_documents(files: Sequence[Path], options: CorpusOptions, stats: CorpusStats) -> Iterator[list[str]]:
    """Stream documents from every file in order, updating ``stats`` as files are read."""
    separator = re.compile(options.doc_separator) if options.doc_separator else None
    for path in files:
        fmt = detect_format(path, options.format)
        stats.files += 1
        stats.formats[str(path)] = fmt
        stats.input_bytes += os.path.getsize(path)
        before = _invalid_bytes.count
        if fmt == "jsonl":
            documents = _read_jsonl(path, options.text_field)
        elif fmt == "prose":
            documents = _read_prose(path, separator)
        else:
            documents = _read_lines(path, separator)
        try:
            for document in documents:
                stats.documents += 1
                stats.sentences += len(document)
                yield document
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise UserError(f"{path}: cannot read: {e}") from None
        invalid = _invalid_bytes.count - before
        if invalid:
            stats.invalid_utf8_bytes += invalid
            stats.invalid_utf8_by_file[str(path)] = invalid
