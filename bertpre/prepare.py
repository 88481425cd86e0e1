"""``bertpre prepare``: raw text -> tokenizer + sentence-pair dataset on disk.

Flow: input files -> documents (corpus.py) -> train/validation by document -> token ids
-> blocks of documents -> sentence pairs (pairs.py) -> Arrow record batches -> a
datasets ``DatasetDict`` saved with ``save_to_disk``, plus ``prepare.json``.

Memory is bounded by the block size: documents are tokenized and paired one block at a
time, and NotNext partners are drawn from the same block. Everything is written into a
staging folder that is renamed to the output only once complete.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer
from tqdm import tqdm

import bertpre
from bertpre.corpus import CorpusOptions, CorpusStats, expand_inputs, read_documents
from bertpre.errors import UserError
from bertpre.masking import Masker, default_max_predictions
from bertpre.pairs import Document, Instance, PairOptions, create_instances, encode_instance
from bertpre.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_tokenizer, vocab_fingerprint

SCHEMA_VERSION = 1
SPLITS = ("train", "validation")
BLOCK_TOKENS = 8_000_000  # documents paired together; bounds memory (~32 MB of ids)
TOKENIZE_BATCH = 2_000  # sentences per encode_batch call
HISTOGRAM_BINS = 16


@dataclass
class PrepareOptions:
    inputs: list[str]
    output: Path
    corpus: CorpusOptions = field(default_factory=CorpusOptions)
    pairs: PairOptions = field(default_factory=PairOptions)
    tokenizer: str | None = None
    vocab_size: int = 30522
    cased: bool = False
    seed: int = 12345
    validation_fraction: float = 0.05
    dupe_factor: int = 1
    static_masking: bool = False
    whole_word_masking: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UserError(f"--validation-fraction must be in [0, 1), got {self.validation_fraction}")
        if self.dupe_factor < 1:
            raise UserError(f"--dupe-factor must be at least 1, got {self.dupe_factor}")
        if self.whole_word_masking and not self.static_masking:
            raise UserError("--whole-word-masking at prepare time needs --static-masking "
                            "(with dynamic masking, set data.whole_word_masking in the training config)")

    def to_json(self) -> dict:
        record = asdict(self)
        record["output"] = str(self.output)
        return record


@dataclass
class SplitStats:
    documents: int = 0
    sentences: int = 0
    tokens: int = 0
    unk_tokens: int = 0
    instances: int = 0
    not_next: int = 0
    short_target: int = 0
    truncated: int = 0
    length_counts: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)

    def __add__(self, other: SplitStats) -> SplitStats:
        counts = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "length_counts"}
        return SplitStats(**counts, length_counts=[a + b for a, b in zip(self.length_counts, other.length_counts)])


def is_validation_document(index: int, fraction: float) -> bool:
    """Whether document ``index`` (0-based, in input order) is held out for validation.

    From the second document on, the first of each run of 1/fraction documents is: of n
    documents, ceil((n - 1) * fraction) are held out, spread evenly and decided while
    streaming, and a one-document corpus keeps its document for training.
    """
    i = index - 1
    return i >= 0 and fraction > 0 and math.ceil((i + 1) * fraction) > math.ceil(i * fraction)


class _SplitWriter:
    """Collects one split's documents into blocks and writes their pairs as Arrow record batches."""

    def __init__(self, name: str, path: Path, options: PrepareOptions, tokenizer: Tokenizer, dupe_factor: int):
        self.name = name
        self.options = options
        self.special = special_ids(tokenizer)
        self.dupe_factor = dupe_factor
        self.masker = (
            Masker.from_tokenizer(
                tokenizer,
                default_max_predictions(options.pairs.max_seq_length),
                whole_word=options.whole_word_masking,
            )
            if options.static_masking
            else None
        )
        self.stats = SplitStats()
        self.block: list[Document] = []
        self.block_tokens = 0
        self.block_index = 0
        self.schema = _schema(options.static_masking)
        self.writer = pa.ipc.new_stream(str(path), self.schema)

    def add(self, document: Document) -> None:
        self.block.append(document)
        self.block_tokens += sum(len(s) for s in document)
        self.stats.documents += 1
        self.stats.sentences += len(document)
        if self.block_tokens >= BLOCK_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.block:
            return
        for dupe in range(self.dupe_factor):
            rng = random.Random(f"{self.options.seed}:{self.name}:{self.block_index}:{dupe}")
            instances = list(create_instances(self.block, self.options.pairs, rng))
            rng.shuffle(instances)
            mask_rng = np.random.default_rng([self.options.seed, SPLITS.index(self.name), self.block_index, dupe])
            self.writer.write_batch(self._record_batch(instances, mask_rng))
        self.block, self.block_tokens = [], 0
        self.block_index += 1

    def _record_batch(self, instances: list[Instance], mask_rng: np.random.Generator) -> pa.RecordBatch:
        encoded = [encode_instance(inst, self.special.cls, self.special.sep) for inst in instances]
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        input_ids = np.concatenate([ids for ids, _ in encoded])
        token_type_ids = np.concatenate([types for _, types in encoded])
        labels = np.array([inst.is_random_next for inst in instances], dtype=np.int8)
        self._count(instances, lengths)
        columns = {}
        if self.masker is not None:
            columns.update(self._static_masks(input_ids, offsets, mask_rng))  # masks input_ids in place
        offsets32 = offsets.astype(np.int32)
        columns["input_ids"] = pa.ListArray.from_arrays(offsets32, input_ids)
        columns["token_type_ids"] = pa.ListArray.from_arrays(offsets32, token_type_ids)
        columns["next_sentence_label"] = pa.array(labels)
        return pa.RecordBatch.from_pydict(columns, schema=self.schema)

    def _static_masks(self, flat_ids: np.ndarray, offsets: np.ndarray, rng: np.random.Generator) -> dict:
        """Mask ``flat_ids`` in place; return the stored positions and original ids per instance."""
        assert self.masker is not None
        chosen = [self.masker.choose_positions(flat_ids[s:e], rng) for s, e in zip(offsets[:-1], offsets[1:])]
        counts = np.array([len(c) for c in chosen], dtype=np.int64)
        positions = np.concatenate(chosen).astype(np.int32)
        flat_cols = positions + np.repeat(offsets[:-1], counts)
        view = flat_ids.reshape(1, -1)
        originals = self.masker.apply(view, np.zeros(len(flat_cols), dtype=np.int64), flat_cols, rng)
        mask_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        return {
            "masked_lm_positions": pa.ListArray.from_arrays(mask_offsets, positions),
            "masked_lm_ids": pa.ListArray.from_arrays(mask_offsets, originals.astype(np.int32)),
        }

    def _count(self, instances: list[Instance], lengths: np.ndarray) -> None:
        s = self.stats
        s.instances += len(instances)
        s.not_next += sum(inst.is_random_next for inst in instances)
        s.short_target += sum(inst.short_target for inst in instances)
        s.truncated += sum(inst.truncated for inst in instances)
        edges = histogram_edges(self.options.pairs.max_seq_length)
        counts, _ = np.histogram(lengths, bins=edges)
        s.length_counts = [a + int(b) for a, b in zip(s.length_counts, counts)]

    def close(self) -> None:
        self.flush()
        self.writer.close()


def histogram_edges(max_seq_length: int) -> list[int]:
    return [round(i * max_seq_length / HISTOGRAM_BINS) for i in range(HISTOGRAM_BINS)] + [max_seq_length + 1]


def _schema(static_masking: bool) -> pa.Schema:
    fields = [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("token_type_ids", pa.list_(pa.int8())),
        pa.field("next_sentence_label", pa.int8()),
    ]
    if static_masking:
        fields += [
            pa.field("masked_lm_positions", pa.list_(pa.int32())),
            pa.field("masked_lm_ids", pa.list_(pa.int32())),
        ]
    return pa.schema(fields)


def _tokenized_documents(documents: Iterator[list[str]], tokenizer: Tokenizer) -> Iterator[Document]:
    """Token-id documents, tokenized in batches of sentences; empty sentences and documents dropped."""
    pending: list[list[str]] = []
    pending_sentences = 0
    for document in documents:
        pending.append(document)
        pending_sentences += len(document)
        if pending_sentences >= TOKENIZE_BATCH:
            yield from _tokenize(pending, tokenizer)
            pending, pending_sentences = [], 0
    yield from _tokenize(pending, tokenizer)


def _tokenize(documents: list[list[str]], tokenizer: Tokenizer) -> Iterator[Document]:
    if not documents:
        return
    sentences = [s for d in documents for s in d]
    encodings = tokenizer.encode_batch_fast(sentences, add_special_tokens=False)
    ids = iter([np.array(e.ids, dtype=np.int32) for e in encodings])
    for document in documents:
        tokenized = [s for s in (next(ids) for _ in document) if len(s)]
        if tokenized:
            yield tokenized


def _obtain_tokenizer(options: PrepareOptions, files: list[Path]) -> tuple[Tokenizer, float]:
    start = time.perf_counter()
    if options.tokenizer:
        return load_tokenizer(options.tokenizer, lowercase=not options.cased), 0.0
    stats = CorpusStats()
    documents = read_documents(files, options.corpus, stats)
    sentences = [s for d in _progress(documents, "reading text for the tokenizer", "documents") for s in d]
    tokenizer = train_tokenizer(sentences, options.vocab_size, lowercase=not options.cased)
    if stats.sentences == 0:
        raise UserError(f"no text found in the inputs ({len(files)} files): the corpus is empty")
    return tokenizer, time.perf_counter() - start


def _progress(iterable, desc: str, unit: str):
    return tqdm(iterable, desc=desc, unit=f" {unit}", disable=None, mininterval=1.0, leave=False)


def prepare(options: PrepareOptions) -> dict:
    """Run the whole preparation; returns the record also written to ``prepare.json``."""
    output = options.output
    if output.exists() and any(output.iterdir()) and not options.overwrite:
        raise UserError(f"--output {output} exists and is not empty (use --overwrite to replace it)")
    files = expand_inputs(options.inputs)
    started = time.perf_counter()
    staging = output.parent / f".{output.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        record = _prepare_into(staging, options, files)
        record["seconds"] = round(time.perf_counter() - started, 2)
        (staging / "prepare.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _prepare_into(staging: Path, options: PrepareOptions, files: list[Path]) -> dict:
    import datasets  # slow to import; only needed here

    tokenizer, tokenizer_seconds = _obtain_tokenizer(options, files)
    save_tokenizer(tokenizer, staging)
    arrow_dir = staging / "arrow"
    arrow_dir.mkdir()
    writers = {
        name: _SplitWriter(name, arrow_dir / f"{name}.arrow", options, tokenizer,
                           options.dupe_factor if name == "train" else 1)
        for name in SPLITS
    }
    corpus_stats = CorpusStats()
    documents = _tokenized_documents(read_documents(files, options.corpus, corpus_stats), tokenizer)
    special = special_ids(tokenizer)
    for index, document in enumerate(_progress(documents, "tokenizing and pairing", "documents")):
        split = "validation" if is_validation_document(index, options.validation_fraction) else "train"
        stats = writers[split].stats
        stats.tokens += sum(len(s) for s in document)
        stats.unk_tokens += sum(int(np.count_nonzero(s == special.unk)) for s in document)
        writers[split].add(document)
    for writer in writers.values():
        writer.close()
    if writers["train"].stats.instances == 0:
        if corpus_stats.sentences == 0:
            raise UserError(f"no text found in the inputs ({len(files)} files): the corpus is empty")
        raise UserError("no training pairs: every document went to validation; lower --validation-fraction")
    features = datasets.Features(
        {f.name: _feature(f.type) for f in writers["train"].schema}
    )
    # An empty split is left out: datasets saves it as zero shards that it cannot load again.
    splits = {
        name: datasets.Dataset.from_file(str(arrow_dir / f"{name}.arrow"), info=datasets.DatasetInfo(features=features))
        for name in SPLITS
        if writers[name].stats.instances
    }
    datasets.disable_progress_bars()
    datasets.DatasetDict(splits).save_to_disk(str(staging / "dataset"))
    del splits
    shutil.rmtree(arrow_dir)
    return _record(options, files, tokenizer, tokenizer_seconds, corpus_stats, {n: w.stats for n, w in writers.items()})


def _feature(arrow_type: pa.DataType):
    import datasets

    if pa.types.is_list(arrow_type):
        return datasets.List(datasets.Value(str(arrow_type.value_type)))
    return datasets.Value(str(arrow_type))


def _record(options, files, tokenizer, tokenizer_seconds, corpus: CorpusStats, splits: dict[str, SplitStats]) -> dict:
    total = sum(splits.values(), SplitStats())
    instances = max(total.instances, 1)
    return {
        "schema_version": SCHEMA_VERSION,
        "bertpre_version": bertpre.__version__,
        "options": options.to_json(),
        "tokenizer": {
            "vocab_size": tokenizer.get_vocab_size(),
            "fingerprint": vocab_fingerprint(tokenizer),
            "special_ids": asdict(special_ids(tokenizer)),
            "trained": options.tokenizer is None,
            "seconds": round(tokenizer_seconds, 2),
        },
        "max_seq_length": options.pairs.max_seq_length,
        "static_masking": options.static_masking,
        "counts": {
            "files": len(files),
            "input_bytes": corpus.input_bytes,
            "documents": corpus.documents,
            "documents_used": total.documents,
            "sentences": total.sentences,
            "tokens": total.tokens,
            "instances": total.instances,
            "splits": {name: {"documents": s.documents, "instances": s.instances} for name, s in splits.items()},
        },
        "statistics": {
            "not_next_fraction": round(total.not_next / instances, 4),
            "short_target_fraction": round(total.short_target / instances, 4),
            "truncated_fraction": round(total.truncated / instances, 4),
            "truncated": total.truncated,
            "unk_rate": round(total.unk_tokens / max(total.tokens, 1), 6),
            "invalid_utf8_bytes": corpus.invalid_utf8_bytes,
            "invalid_utf8_by_file": corpus.invalid_utf8_by_file,
            "length_histogram": {
                "bin_edges": histogram_edges(options.pairs.max_seq_length),
                "counts": total.length_counts,
            },
        },
    }


def summary(record: dict, output: Path) -> str:
    """The one-screen report printed at the end of ``bertpre prepare``."""
    c, s, t = record["counts"], record["statistics"], record["tokenizer"]
    hist = s["length_histogram"]
    peak = max(hist["counts"]) or 1
    edges = hist["bin_edges"]
    bars = "\n".join(
        f"    {edges[i]:>4}-{edges[i + 1] - 1:<4} {'#' * (max(1, round(40 * n / peak)) if n else 0):<40} {n}"
        for i, n in enumerate(hist["counts"])
    )
    warnings = []
    if c["documents_used"] < 2:
        warnings.append("only one document: NotNext partners come from that same document")
    if c["splits"]["validation"]["instances"] == 0:
        warnings.append("the validation split is empty (one document, or --validation-fraction 0): training "
                        "will run without validation; --doc-separator can split a file into documents")
    elif c["splits"]["validation"]["documents"] == 1:
        warnings.append("the validation split has one document, so its NotNext partners come from that same "
                        "document: val/nsp_accuracy then measures a harder task than training does "
                        "(more documents, e.g. with --doc-separator, avoid this)")
    if s["invalid_utf8_bytes"]:
        warnings.append(f"{s['invalid_utf8_bytes']} bytes were not valid UTF-8 and were replaced "
                        f"(per file in prepare.json)")
    lines = [
        f"prepared {output} in {record['seconds']} s",
        f"  input       {c['files']} files, {c['input_bytes'] / 1e6:.1f} MB, {c['documents']} documents, "
        f"{c['sentences']} sentences, {c['tokens']} tokens",
        f"  tokenizer   {'trained' if t['trained'] else 'reused'}, vocab {t['vocab_size']}, "
        f"[UNK] rate {100 * s['unk_rate']:.3f}%",
        f"  pairs       train {c['splits']['train']['instances']} ({c['splits']['train']['documents']} documents), "
        f"validation {c['splits']['validation']['instances']} ({c['splits']['validation']['documents']} documents)",
        f"  NotNext {100 * s['not_next_fraction']:.1f}%   short targets {100 * s['short_target_fraction']:.1f}%   "
        f"truncated {100 * s['truncated_fraction']:.1f}%",
        "  sequence lengths:",
        bars,
    ] + [f"  warning: {w}" for w in warnings]
    return "\n".join(lines)
