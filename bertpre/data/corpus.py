"""Raw text -> documents: find input files, detect their format, split prose into sentences.

A document is a list of sentences (strings). Three input formats are understood:

- ``lines``: one sentence per line, blank lines between documents (Google's format);
- ``prose``: wrapped lines with blank-line paragraphs; split into sentences here;
- ``jsonl``: one JSON object per line, one document each, its text in a configurable field.

Tables are read too, one document per row, its text in the same configurable field:
Parquet files (``.parquet``) and datasets saved with ``save_to_disk`` (a folder; every
split of a ``DatasetDict``). Text files may be compressed (.gz, .bz2, .xz).

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
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO

from bertpre.data.encodings import other_chinese_encoding, reads_as_text
from bertpre.data.sentences import split_sentences
from bertpre.errors import UserError

FORMATS = ("auto", "lines", "prose", "jsonl")
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_SNIFF_BYTES = 1 << 16
_TERMINAL = tuple('.!?"\')]\u201d\u2019:;\u3002\uff01\uff1f\u2026\u300d\u300f\uff09')
_WORD = re.compile(r"[^\W_]")
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class _InvalidByteCounter:
    """Codec error handler that replaces undecodable bytes with U+FFFD and counts them."""

    name = "bertpre-count-invalid"

    def __init__(self) -> None:
        self.count = 0
        self.chinese_like = 0  # of those, where two bytes read as a GB18030 Chinese character (GBK text)
        codecs.register_error(self.name, self)

    def __call__(self, exc: UnicodeError) -> tuple[str, int]:
        assert isinstance(exc, UnicodeDecodeError)
        self.count += exc.end - exc.start
        try:
            self.chinese_like += "\u4e00" <= bytes(exc.object[exc.start : exc.start + 2]).decode("gb18030") <= "\u9fff"
        except UnicodeDecodeError:
            pass
        return "\ufffd", exc.end


_invalid_bytes = _InvalidByteCounter()


@dataclass
class CorpusOptions:
    format: str = "auto"
    text_field: str = "text"
    doc_separator: str | None = None
    skip_unreadable: bool = False  # report and count unreadable files instead of stopping
    encoding: str = "utf-8"  # of text files without a byte-order mark (a BOM names its own encoding)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        try:
            self.encoding = codecs.lookup(self.encoding).name
        except LookupError:
            raise UserError(f"--encoding: unknown encoding {self.encoding!r} (e.g. utf-8, gb18030, big5, utf-16)") from None
        if self.doc_separator is not None:
            try:
                re.compile(self.doc_separator)
            except re.error as e:
                raise UserError(f"--doc-separator is not a valid regular expression: {e}") from None


@dataclass
class CorpusCounts:
    """What reading the inputs found, as a prepared folder's record keeps it (and adds up over shards)."""

    files: int = 0
    input_bytes: int = 0
    documents: int = 0
    invalid_utf8_bytes: int = 0
    invalid_utf8_by_file: dict[str, int] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)  # "path: reason"

    def counts(self) -> CorpusCounts:
        return CorpusCounts(**{f.name: getattr(self, f.name) for f in fields(CorpusCounts)})

    def __add__(self, other: CorpusCounts) -> CorpusCounts:
        """Counts and lists add up, per-file maps merge."""
        added = {}
        for f in fields(CorpusCounts):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            added[f.name] = {**mine, **theirs} if isinstance(mine, dict) else mine + theirs
        return CorpusCounts(**added)


@dataclass
class CorpusStats(CorpusCounts):
    """The reader's running counts: the record's, plus what only this run needs."""

    sentences: int = 0
    formats: dict[str, str] = field(default_factory=dict)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by datasets' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def input_size(path: Path) -> int:
    """Bytes on disk of an input file or saved dataset folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*.arrow"))
    return os.path.getsize(path)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively, hidden entries skipped) and glob patterns -> files.

    Each real file is taken once: a file reached twice (named twice, through a symbolic
    link, or inside a folder given as well) is read at its first place only, and a link
    back to a folder being walked (a loop) is not followed."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() or (path.is_dir() and is_saved_dataset(path)):
            files.append(path)
        elif path.is_dir():
            found = _files_in(path, set())
            if not found:
                raise UserError(f"input folder {item} contains no files")
            files.extend(found)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise UserError(f"input not found: {item}")
            files.extend(matches)
    unique: dict[Path, Path] = {}
    for file in files:
        unique.setdefault(file.resolve(), file)
    if not unique:
        raise UserError("no input files given")
    return list(unique.values())


def _files_in(folder: Path, walking: set[Path]) -> list[Path]:
    """Files under ``folder``, recursively and in sorted order; hidden entries skipped, a
    saved dataset inside taken as one input, and a folder already on the walk's path (a
    symbolic-link loop) skipped."""
    real = folder.resolve()
    if real in walking:
        return []
    walking = walking | {real}
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.extend([entry] if is_saved_dataset(entry) else _files_in(entry, walking))
        elif entry.is_file():
            found.append(entry)
    return found


def _content_suffix(path: Path) -> str:
    """The suffix that says what the content is: 'a.jsonl.gz' -> '.jsonl'."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def _open_binary(path: Path) -> IO[bytes]:
    opener = _COMPRESSED.get(path.suffix.lower(), open)
    return opener(path, "rb")


def _open_text(path: Path, encoding: str) -> io.TextIOWrapper:
    """``path`` as text in ``encoding``, as ``_sniff`` resolved it (a BOM's, else the one asked for)."""
    return io.TextIOWrapper(_open_binary(path), encoding=encoding, errors=_invalid_bytes.name)


def _head(path: Path) -> bytes:
    try:
        with _open_binary(path) as f:
            return f.read(_SNIFF_BYTES)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def _text_encoding(head: bytes, requested: str) -> str:
    """The encoding a byte-order mark names (which wins over --encoding), else the one requested."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    return requested


def _sniff(path: Path, encoding: str) -> tuple[str, str]:
    """The start of a text file, decoded, and the encoding to read it in; refuses binary files and text
    in another encoding than the one it is read with, in one line that names the file and the option."""
    head = _head(path)
    encoding = _text_encoding(head, encoding)
    if b"\x00" in head and not encoding.startswith("utf-16") and not encoding.startswith("utf-32"):
        wide = next((order for order in ("le", "be") if reads_as_text(head, f"utf-16-{order}")), None)
        hint = f" (UTF-16 text without a byte-order mark? pass --encoding utf-16-{wide})" if wide else ""
        raise UserError(f"{path}: binary file (contains NUL bytes), not text{hint}")
    text = head.decode(encoding, errors="replace")
    if encoding == "utf-8" and text.count("\ufffd") > max(8, len(head) // 1000):
        other = other_chinese_encoding(head)
        if other:  # other invalid bytes are replaced, counted and reported, as before
            raise UserError(f"{path}: not UTF-8 ({text.count(chr(0xFFFD))} invalid sequences in its first "
                            f"{len(head)} bytes); it reads as {other} Chinese text: pass --encoding {other}")
    return text, encoding


def detect_format(path: Path, requested: str = "auto", encoding: str = "utf-8") -> str:
    """The explicit format if one was asked for, else guess from the extension and the content.
    Parquet files and saved datasets are always read as tables ("parquet", "dataset")."""
    return _detect(path, requested, encoding)[0]


def _detect(path: Path, requested: str, encoding: str) -> tuple[str, str]:
    """(format, the encoding a text file is read in), from one read of the file's start."""
    if path.is_dir():
        return "dataset", encoding
    if path.suffix.lower() == ".parquet":
        return "parquet", encoding
    sample, encoding = _sniff(path, encoding)
    if requested != "auto":
        return requested, encoding
    return _format_of(path, sample), encoding


def _format_of(path: Path, sample: str) -> str:
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
    one_sentence = sum(len(split_sentences(line)) <= 1 for line in nonblank) / len(nonblank)
    return "lines" if terminal >= 0.5 and one_sentence >= 0.85 else "prose"


def _read_lines(path: Path, separator: re.Pattern | None, encoding: str) -> Iterator[list[str]]:
    document: list[str] = []
    with _open_text(path, encoding) as f:
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


def _read_prose(path: Path, separator: re.Pattern | None, encoding: str) -> Iterator[list[str]]:
    document: list[str] = []
    paragraph: list[str] = []
    with _open_text(path, encoding) as f:
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


def _read_jsonl(path: Path, text_field: str, encoding: str) -> Iterator[list[str]]:
    with _open_text(path, encoding) as f:
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
            document = document_from_text(text)
            if document:
                yield document


def document_from_text(text: str) -> list[str]:
    """One document's text (paragraphs separated by blank lines) -> its sentences."""
    return [s for para in re.split(r"\n\s*\n", text) for s in split_sentences(para)]


class UnreadableInput(UserError):
    """An input file whose content cannot be read (damaged, or not the format it claims)."""


def _text_column_batches(path: Path, fmt: str, text_field: str) -> Iterator[list]:
    """Batches of the text column of a Parquet file or a saved dataset, memory-mapped or streamed."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for files that are not Parquet
            raise UnreadableInput(f"{path}: cannot read as Parquet: {e}") from None
        if text_field not in table.schema_arrow.names:
            raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}; "
                            f"set --text-field)")
        try:
            for batch in table.iter_batches(batch_size=1000, columns=[text_field]):
                yield batch.column(0).to_pylist()
        except Exception as e:  # a damaged row group: ArrowInvalid, OSError, ...
            raise UnreadableInput(f"{path}: cannot read as Parquet: {e}") from None
        return
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for folders it cannot load
        raise UnreadableInput(f"{path}: cannot load as a saved dataset: {e}") from None
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        if text_field not in part.column_names:
            raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(part.column_names)}; "
                            f"set --text-field)")
        for batch in part.select_columns([text_field]).iter(batch_size=1000):
            yield batch[text_field]


def _text_column_documents(path: Path, fmt: str, text_field: str) -> Iterator[list[str]]:
    for texts in _text_column_batches(path, fmt, text_field):
        for text in texts:
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}: column {text_field!r} does not hold text")
            document = document_from_text(text)
            if document:
                yield document


def read_documents(files: Sequence[Path], options: CorpusOptions, stats: CorpusStats) -> Iterator[list[str]]:
    """Stream documents from every file in order, updating ``stats`` as files are read.

    A file that cannot be read stops the run with its name, or with ``skip_unreadable`` is
    listed in ``stats.skipped_files`` (documents read before a mid-file error are kept).
    """
    separator = re.compile(options.doc_separator) if options.doc_separator else None
    for path in files:
        try:
            fmt, encoding = _detect(path, options.format, options.encoding)
        except UserError as e:
            if not options.skip_unreadable:
                raise UserError(f"{e} (--skip-unreadable skips such files)") from None
            stats.skipped_files.append(str(e))
            continue
        stats.files += 1
        stats.formats[str(path)] = fmt
        stats.input_bytes += input_size(path)
        before, chinese_before = _invalid_bytes.count, _invalid_bytes.chinese_like
        if fmt in ("parquet", "dataset"):
            documents = _text_column_documents(path, fmt, options.text_field)
        elif fmt == "jsonl":
            documents = _read_jsonl(path, options.text_field, encoding)
        elif fmt == "prose":
            documents = _read_prose(path, separator, encoding)
        else:
            documents = _read_lines(path, separator, encoding)
        has_words, documents_before = False, stats.documents  # a letter, digit or ideograph somewhere in the file
        try:
            for document in documents:
                has_words = has_words or any(_WORD.search(sentence) for sentence in document)
                stats.documents += 1
                stats.sentences += len(document)
                yield document
        except (OSError, EOFError, lzma.LZMAError, zlib.error, UnreadableInput) as e:
            message = str(e) if isinstance(e, UnreadableInput) else f"{path}: cannot read: {e}"
            if not options.skip_unreadable:
                raise UserError(message + " (--skip-unreadable skips such files)") from None
            stats.skipped_files.append(message)
        if stats.documents > documents_before and not has_words:
            raise UserError(f"{path}: no letters, digits or characters, only punctuation and spaces: not text "
                            "to pretrain on (remove it from --input)")
        invalid = _invalid_bytes.count - before
        if _invalid_bytes.chinese_like - chinese_before > max(16, input_size(path) // 1000):  # GBK inside
            raise UserError(f"{path}: {invalid} bytes are not valid {options.encoding} (a part in another encoding, "
                            "such as GB18030 in a UTF-8 file?); convert the file to one encoding or set --encoding")
        if invalid:
            stats.invalid_utf8_bytes += invalid
            stats.invalid_utf8_by_file[str(path)] = invalid
