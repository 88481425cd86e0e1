"""``bertpre prepare``: raw text -> tokenizer + sentence-pair dataset on disk.

Flow: input files -> documents (corpus.py) -> train/validation by document -> blocks of
documents -> token ids -> sentence pairs (pairs.py) -> Arrow record batches -> Arrow
files ``dataset/{split}-NNNNN.arrow``, plus ``prepare.json`` and the tokenizer.

Memory is bounded by the block size: documents are tokenized and paired one block at a
time, in ``num_proc`` processes, and NotNext partners are drawn from the same block.
Output files are written batch by batch and never read back. Everything is written into a
staging folder that is renamed to the output only once complete.

The Arrow files are in the stream format that ``datasets.Dataset.from_file`` memory-maps;
``PreparedData.load_dataset`` returns them as a ``DatasetDict`` without loading them.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer
from tqdm import tqdm

import bertpre
from bertpre.corpus import CorpusOptions, CorpusStats, expand_inputs, input_size, read_documents
from bertpre.errors import UserError
from bertpre.masking import Masker, default_max_predictions
from bertpre.pairs import Document, Instance, PairOptions, create_instances, encode_instance
from bertpre.tokenizer import (
    SentenceEncoder,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    train_tokenizer,
    vocab_fingerprint,
)

SCHEMA_VERSION = 2  # 2: dataset/{split}-NNNNN.arrow files (1: a save_to_disk folder)
OUTPUT_FILE_BYTES = 1 << 29  # a split's next record batch goes to a new file after 512 MiB
SPLITS = ("train", "validation")
BLOCK_CHARS = 2_000_000  # characters of text paired together (about 500k tokens); bounds memory
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
    num_proc: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    shard_index: int = 0
    num_shards: int = 1
    tokenizer_sample_mb: float = 100.0

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.num_proc < 1:
            raise UserError(f"--num-proc must be at least 1, got {self.num_proc}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard-index must be in [0, --num-shards), got {self.shard_index} of {self.num_shards}")
        if self.num_shards > 1 and self.tokenizer is None:
            raise UserError("--num-shards needs --tokenizer: every shard must use the same vocabulary "
                            "(train one first with `bertpre tokenizer`)")
        if self.tokenizer_sample_mb <= 0:
            raise UserError(f"--tokenizer-sample-mb must be positive, got {self.tokenizer_sample_mb}")
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


@dataclass
class TextBlock:
    """Documents of one split that are tokenized and paired together (NotNext partners come
    from the same block). Blocks are cut by characters, so their bounds do not depend on
    the tokenizer or on the number of processes."""

    split: str
    index: int
    documents: list[list[str]]


def text_blocks(documents: Iterator[list[str]], validation_fraction: float) -> Iterator[TextBlock]:
    """Route documents to train or validation and cut each split into blocks of at most
    BLOCK_CHARS characters. A document longer than that is cut, between sentences, into
    pieces that are paired as documents of their own, so no block (and no process) ever
    holds more than about BLOCK_CHARS of text, whatever the corpus."""
    pending: dict[str, list[list[str]]] = {name: [] for name in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    made = dict.fromkeys(SPLITS, 0)
    for index, document in enumerate(documents):
        split = "validation" if is_validation_document(index, validation_fraction) else "train"
        for piece, size in _pieces(document):
            if pending[split] and chars[split] + size > BLOCK_CHARS:
                yield TextBlock(split, made[split], pending[split])
                pending[split], chars[split] = [], 0
                made[split] += 1
            pending[split].append(piece)
            chars[split] += size
    for split in SPLITS:
        if pending[split]:
            yield TextBlock(split, made[split], pending[split])


def _pieces(document: list[str]) -> Iterator[tuple[list[str], int]]:
    """The document in runs of sentences of at most BLOCK_CHARS characters (a longer sentence
    is a run of its own), with their sizes."""
    piece: list[str] = []
    size = 0
    for sentence in document:
        if piece and size + len(sentence) > BLOCK_CHARS:
            yield piece, size
            piece, size = [], 0
        piece.append(sentence)
        size += len(sentence)
    if piece:
        yield piece, size


class BlockProcessor:
    """Text block -> Arrow record batches of sentence pairs (one per dupe) and their statistics.

    The result depends only on the block, the tokenizer and the options, so blocks can be
    processed in any process, in any order, and written in block order.
    """

    def __init__(self, tokenizer: Tokenizer, options: PrepareOptions) -> None:
        self.options = options
        self.encoder = SentenceEncoder(tokenizer)
        self.special = special_ids(tokenizer)
        self.masker = (
            Masker.from_tokenizer(tokenizer, default_max_predictions(options.pairs.max_seq_length),
                                  whole_word=options.whole_word_masking)
            if options.static_masking
            else None
        )
        self.schema = arrow_schema(options.static_masking)

    def __call__(self, block: TextBlock) -> tuple[str, list[pa.RecordBatch], SplitStats]:
        stats = SplitStats()
        documents = self._tokenize(block.documents, stats)
        dupes = self.options.dupe_factor if block.split == "train" else 1
        batches = []
        o = self.options
        for dupe in range(dupes):
            rng = random.Random(f"{o.seed}:{o.shard_index}:{block.split}:{block.index}:{dupe}")
            instances = list(create_instances(documents, o.pairs, rng))
            rng.shuffle(instances)
            mask_rng = np.random.default_rng([o.seed, o.shard_index, SPLITS.index(block.split), block.index, dupe])
            batches.append(self._record_batch(instances, mask_rng, stats))
        return block.split, batches, stats

    def _tokenize(self, documents: list[list[str]], stats: SplitStats) -> list[Document]:
        """Token-id documents; sentences and documents without tokens are dropped."""
        ids, counts = self.encoder.encode([s for d in documents for s in d])
        sentences = np.split(ids, np.cumsum(counts)[:-1]) if len(counts) else []
        out, at = [], 0
        for document in documents:
            tokenized = [s for s, n in zip(sentences[at : at + len(document)], counts[at : at + len(document)]) if n]
            at += len(document)
            if tokenized:
                out.append(tokenized)
                stats.documents += 1
                stats.sentences += len(tokenized)
        stats.tokens += int(counts.sum())
        stats.unk_tokens += int(np.count_nonzero(ids == self.special.unk))
        return out

    def _record_batch(self, instances: list[Instance], mask_rng: np.random.Generator,
                      stats: SplitStats) -> pa.RecordBatch:
        encoded = [encode_instance(inst, self.special.cls, self.special.sep) for inst in instances]
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        input_ids = np.concatenate([ids for ids, _ in encoded]) if encoded else np.zeros(0, np.int32)
        token_type_ids = np.concatenate([types for _, types in encoded]) if encoded else np.zeros(0, np.int8)
        labels = np.array([inst.is_random_next for inst in instances], dtype=np.int8)
        _count(stats, instances, lengths, self.options.pairs.max_seq_length)
        columns = {}
        if self.masker is not None:
            columns.update(self._static_masks(input_ids, offsets, mask_rng))  # masks input_ids in place
        offsets32 = offsets.astype(np.int32)
        columns["input_ids"] = pa.ListArray.from_arrays(offsets32, input_ids.astype(np.int32))
        columns["token_type_ids"] = pa.ListArray.from_arrays(offsets32, token_type_ids.astype(np.int8))
        columns["next_sentence_label"] = pa.array(labels, type=pa.int8())
        return pa.RecordBatch.from_pydict(columns, schema=self.schema)

    def _static_masks(self, flat_ids: np.ndarray, offsets: np.ndarray, rng: np.random.Generator) -> dict:
        """Mask ``flat_ids`` in place; return the stored positions and original ids per instance."""
        assert self.masker is not None
        chosen = [self.masker.choose_positions(flat_ids[s:e], rng) for s, e in zip(offsets[:-1], offsets[1:])]
        counts = np.array([len(c) for c in chosen], dtype=np.int64)
        positions = np.concatenate(chosen).astype(np.int32) if chosen else np.zeros(0, np.int32)
        flat_cols = positions + np.repeat(offsets[:-1], counts)
        view = flat_ids.reshape(1, -1)
        originals = self.masker.apply(view, np.zeros(len(flat_cols), dtype=np.int64), flat_cols, rng)
        mask_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        return {
            "masked_lm_positions": pa.ListArray.from_arrays(mask_offsets, positions),
            "masked_lm_ids": pa.ListArray.from_arrays(mask_offsets, originals.astype(np.int32)),
        }


def _count(s: SplitStats, instances: list[Instance], lengths: np.ndarray, max_seq_length: int) -> None:
    s.instances += len(instances)
    s.not_next += sum(inst.is_random_next for inst in instances)
    s.short_target += sum(inst.short_target for inst in instances)
    s.truncated += sum(inst.truncated for inst in instances)
    counts, _ = np.histogram(lengths, bins=histogram_edges(max_seq_length))
    s.length_counts = [a + int(b) for a, b in zip(s.length_counts, counts)]


class SplitFiles:
    """Writes one split's record batches into ``{split}-00000.arrow``, ``-00001``, ... (a new
    file after OUTPUT_FILE_BYTES); no file for a split without rows."""

    def __init__(self, directory: Path, split: str, schema: pa.Schema) -> None:
        self.directory, self.split, self.schema = directory, split, schema
        self.paths: list[Path] = []
        self.writer: pa.ipc.RecordBatchStreamWriter | None = None
        self.sink: pa.OSFile | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self.writer is None or self.sink.tell() >= OUTPUT_FILE_BYTES:
            self.close()
            self.paths.append(self.directory / f"{self.split}-{len(self.paths):05d}.arrow")
            self.sink = pa.OSFile(str(self.paths[-1]), "wb")
            self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.writer.write_batch(batch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = self.sink = None


def _release_freed_memory() -> None:
    """Hand memory freed by a block back to the system (glibc keeps it otherwise, and the
    process grows with the number of blocks it has seen)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_processor: BlockProcessor | None = None  # one per worker process


def _start_worker(tokenizer_json: str, options: PrepareOptions) -> None:
    global _processor
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it ends the pool)
    _processor = BlockProcessor(Tokenizer.from_str(tokenizer_json), options)


def _process_in_worker(block: TextBlock) -> tuple[str, list[pa.RecordBatch], SplitStats]:
    assert _processor is not None
    result = _processor(block)
    _release_freed_memory()
    return result


def processed_blocks(blocks: Iterator[TextBlock], tokenizer: Tokenizer, options: PrepareOptions) -> Iterator:
    """Results of ``BlockProcessor`` for each block, in block order, computed by
    ``options.num_proc`` processes with one block more than processes in flight."""
    if options.num_proc == 1:
        processor = BlockProcessor(tokenizer, options)
        for block in blocks:
            yield processor(block)
            _release_freed_memory()
        return
    # forkserver: workers fork from a fresh single-threaded server, never from this process,
    # whose threads (Arrow's, the tokenizer's, torch's in a notebook) may hold locks at fork time.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["bertpre.prepare"])
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork warning
    try:
        with context.Pool(options.num_proc, _start_worker, (tokenizer.to_str(), options)) as pool:
            in_flight: collections.deque = collections.deque()
            for block in blocks:
                in_flight.append(pool.apply_async(_process_in_worker, (block,)))
                if len(in_flight) > options.num_proc:
                    yield in_flight.popleft().get()
            while in_flight:
                yield in_flight.popleft().get()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def histogram_edges(max_seq_length: int) -> list[int]:
    return [round(i * max_seq_length / HISTOGRAM_BINS) for i in range(HISTOGRAM_BINS)] + [max_seq_length + 1]


def arrow_schema(static_masking: bool) -> pa.Schema:
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


def tokenizer_sample(files: list[Path], corpus: CorpusOptions, sample_mb: float, seed: int) -> list[str]:
    """Sentences to train the tokenizer on: all of them if the inputs hold at most ``sample_mb``
    MB, else a seeded random share of sentences (the share the budget allows) capped at the
    budget, so that time and memory stay bounded. (Compressed inputs count at their size on
    disk, so with them the cap, not the share, may end the sample.)"""
    budget = int(sample_mb * 1e6)
    total = sum(input_size(path) for path in files)
    keep = min(1.0, budget / max(total, 1))
    rng = random.Random(f"{seed}:tokenizer")
    sentences: list[str] = []
    taken = 0
    for document in _progress(read_documents(files, corpus, CorpusStats()), "reading text for the tokenizer",
                              "documents"):
        chosen = document if keep == 1.0 else [s for s in document if rng.random() < keep]
        sentences.extend(chosen)
        taken += sum(map(len, chosen))
        if taken >= budget:
            break
    return sentences


def build_tokenizer(files: list[Path], corpus: CorpusOptions, vocab_size: int, cased: bool, sample_mb: float,
                    seed: int) -> tuple[Tokenizer, dict]:
    """Train a tokenizer on a bounded sample of the inputs; returns it and a record of the run."""
    start = time.perf_counter()
    sentences = tokenizer_sample(files, corpus, sample_mb, seed)
    if not sentences:
        raise UserError(f"no text found in the inputs ({len(files)} files): the corpus is empty")
    tokenizer = train_tokenizer(sentences, vocab_size, lowercase=not cased)
    return tokenizer, {"trained": True, "seconds": round(time.perf_counter() - start, 2),
                       "sample_chars": sum(map(len, sentences)), "sample_sentences": len(sentences)}


def _obtain_tokenizer(options: PrepareOptions, files: list[Path]) -> tuple[Tokenizer, dict]:
    if options.tokenizer:
        return load_tokenizer(options.tokenizer, lowercase=not options.cased), {"trained": False, "seconds": 0.0}
    return build_tokenizer(files, options.corpus, options.vocab_size, options.cased, options.tokenizer_sample_mb,
                           options.seed)


def _progress(iterable, desc: str, unit: str):
    return tqdm(iterable, desc=desc, unit=f" {unit}", disable=None, mininterval=1.0, leave=False)


@contextlib.contextmanager
def staged_output(output: Path, overwrite: bool, option: str = "--output") -> Iterator[Path]:
    """A staging folder next to ``output`` that becomes ``output`` only when the block completes.

    An interrupted run leaves at most a hidden ``.NAME.partial`` folder (removed by the next
    run), never an ``output`` that looks complete; an existing ``output`` is replaced only
    at the very end, by two renames.
    """
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{option} {output} exists and is not empty (use --overwrite to replace it)")
    staging = output.parent / f".{output.name}.partial"
    previous = output.parent / f".{output.name}.previous"
    for leftover in (staging, previous):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"{option} {output}: cannot create folder there ({e.strerror})") from None
    try:
        yield staging
        if output.exists():
            output.rename(previous)
        staging.rename(output)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise UserError(f"{option} {output}: disk full while writing ({os.strerror(e.errno)}); nothing was written") \
                from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def prepare(options: PrepareOptions) -> dict:
    """Run the whole preparation; returns the record also written to ``prepare.json``."""
    files = expand_inputs(options.inputs)
    started = time.perf_counter()
    with staged_output(options.output, options.overwrite) as staging:
        record = _prepare_into(staging, options, files)
        record["seconds"] = round(time.perf_counter() - started, 2)
        (staging / "prepare.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def write_tokenizer(inputs: list[str], output: Path, corpus: CorpusOptions, vocab_size: int, cased: bool,
                    sample_mb: float, seed: int, overwrite: bool) -> dict:
    """``bertpre tokenizer``: train a tokenizer alone (for sharded preparation) into ``output``."""
    files = expand_inputs(inputs)
    with staged_output(output, overwrite) as staging:
        tokenizer, record = build_tokenizer(files, corpus, vocab_size, cased, sample_mb, seed)
        save_tokenizer(tokenizer, staging)
    return {"vocab_size": tokenizer.get_vocab_size(), "fingerprint": vocab_fingerprint(tokenizer), **record}


def _prepare_into(staging: Path, options: PrepareOptions, files: list[Path]) -> dict:
    tokenizer, tokenizer_record = _obtain_tokenizer(options, files)
    save_tokenizer(tokenizer, staging)
    (staging / "dataset").mkdir()
    schema = arrow_schema(options.static_masking)
    writers = {name: SplitFiles(staging / "dataset", name, schema) for name in SPLITS}
    stats = {name: SplitStats() for name in SPLITS}
    corpus_stats = CorpusStats()
    documents = _progress(read_documents(shard_files(files, options), options.corpus, corpus_stats),
                          "tokenizing and pairing", "documents")
    for split, batches, block_stats in processed_blocks(text_blocks(documents, options.validation_fraction),
                                                        tokenizer, options):
        for batch in batches:
            writers[split].write(batch)
        stats[split] = stats[split] + block_stats
    for writer in writers.values():
        writer.close()
    if stats["train"].instances == 0:
        if corpus_stats.sentences == 0:
            raise UserError(f"no text found in the inputs ({corpus_stats.files} files): the corpus is empty")
        raise UserError("no training pairs: every document went to validation; lower --validation-fraction")
    return make_record(options, tokenizer, tokenizer_record, corpus_stats, stats)


def shard_files(files: list[Path], options: PrepareOptions) -> list[Path]:
    """The input files of this shard: every num_shards-th file from shard_index on."""
    if options.num_shards == 1:
        return files
    if len(files) < options.num_shards:
        raise UserError(f"--num-shards {options.num_shards} is more than the {len(files)} input files "
                        "(shards are made of whole files)")
    return files[options.shard_index :: options.num_shards]


def dataset_features(static_masking: bool):
    import datasets

    return datasets.Features({f.name: _feature(f.type) for f in arrow_schema(static_masking)})


def _feature(arrow_type: pa.DataType):
    import datasets

    if pa.types.is_list(arrow_type):
        return datasets.List(datasets.Value(str(arrow_type.value_type)))
    return datasets.Value(str(arrow_type))


def corpus_counts(corpus: CorpusStats) -> dict:
    return {"files": corpus.files, "input_bytes": corpus.input_bytes, "documents": corpus.documents,
            "invalid_utf8_bytes": corpus.invalid_utf8_bytes, "invalid_utf8_by_file": corpus.invalid_utf8_by_file,
            "skipped_files": corpus.skipped_files}


def make_record(options: PrepareOptions | dict, tokenizer: Tokenizer, tokenizer_record: dict, corpus: CorpusStats | dict,
                splits: dict[str, SplitStats]) -> dict:
    """The prepare.json record. It keeps the raw per-split counts, so records of shards can be
    added up (``bertpre combine``)."""
    corpus = corpus_counts(corpus) if isinstance(corpus, CorpusStats) else corpus
    options = options.to_json() if isinstance(options, PrepareOptions) else options
    total = sum(splits.values(), SplitStats())
    instances = max(total.instances, 1)
    return {
        "schema_version": SCHEMA_VERSION,
        "bertpre_version": bertpre.__version__,
        "options": options,
        "tokenizer": {
            "vocab_size": tokenizer.get_vocab_size(),
            "fingerprint": vocab_fingerprint(tokenizer),
            "special_ids": asdict(special_ids(tokenizer)),
            **tokenizer_record,
        },
        "max_seq_length": options["pairs"]["max_seq_length"],
        "static_masking": options["static_masking"],
        "corpus": corpus,
        "split_stats": {name: asdict(stats) for name, stats in splits.items()},
        "counts": {
            "files": corpus["files"],
            "input_bytes": corpus["input_bytes"],
            "documents": corpus["documents"],
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
            "invalid_utf8_bytes": corpus["invalid_utf8_bytes"],
            "invalid_utf8_by_file": corpus["invalid_utf8_by_file"],
            "skipped_files": corpus["skipped_files"],
            "length_histogram": {
                "bin_edges": histogram_edges(options["pairs"]["max_seq_length"]),
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
    nsp_probability = record["options"]["pairs"]["nsp_probability"]
    if s["not_next_fraction"] > nsp_probability + 0.1:
        warnings.append(f"{100 * s['not_next_fraction']:.1f}% of pairs are NotNext, not {100 * nsp_probability:.0f}%: "
                        "most chunks hold one sentence (documents of one sentence, or sentences longer than "
                        "--max-seq-length), and a one-sentence chunk always gets a random B")
    if s.get("skipped_files"):
        warnings.append(f"{len(s['skipped_files'])} unreadable files were skipped (listed in prepare.json)")
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


class PreparedData:
    """A folder written by ``bertpre prepare`` (or ``bertpre combine``): its record and tokenizer."""

    def __init__(self, path: str | Path, option: str = "data.path") -> None:
        self.path, self.option = Path(path), option
        record_path = self.path / "prepare.json"
        if not self.path.is_dir():
            raise UserError(f"{option} {self.path}: not found (run `bertpre prepare --output {self.path}` first)")
        if not record_path.is_file():
            raise UserError(f"{option} {self.path}: no prepare.json; not a folder written by `bertpre prepare`")
        try:
            self.record = json.loads(record_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{record_path}: not valid JSON ({e.msg})") from None
        version = self.record.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{option} {self.path}: prepared with schema version {version}, this bertpre reads version "
                f"{SCHEMA_VERSION}; run `bertpre prepare` again"
            )
        self.tokenizer: Tokenizer = load_tokenizer(self.path / "tokenizer.json")
        self.fingerprint = vocab_fingerprint(self.tokenizer)
        self.max_seq_length: int = self.record["max_seq_length"]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def split_files(self) -> dict[str, list[Path]]:
        return {name: sorted((self.path / "dataset").glob(f"{name}-*.arrow")) for name in SPLITS}

    def load_dataset(self):
        """The splits as a DatasetDict, memory-mapped: rows are read from disk as they are used,
        so a dataset larger than memory trains as well as a small one."""
        import datasets

        files = self.split_files()
        if not files["train"]:
            raise UserError(f"{self.option} {self.path}: dataset/train-*.arrow missing; run `bertpre prepare` again")
        info = datasets.DatasetInfo(features=dataset_features(self.record["static_masking"]))
        splits = {}
        for name, paths in files.items():
            if paths:
                try:
                    parts = [datasets.Dataset.from_file(str(p), info=info) for p in paths]
                except (OSError, pa.ArrowInvalid) as e:
                    raise UserError(f"{self.option} {self.path}: cannot read {name} data ({e})") from None
                splits[name] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return datasets.DatasetDict(splits)


def combine(shards: list[str], output: Path, overwrite: bool = False) -> dict:
    """``bertpre combine``: the outputs of sharded prepare runs -> one prepared folder.

    The shards must share the tokenizer, the sequence length and the masking mode; their
    splits are concatenated in the order given (files are hard-linked where the file system
    allows, else copied) and their statistics added up.
    """
    if len(shards) < 2:
        raise UserError("bertpre combine needs at least two prepared folders")
    parts = [PreparedData(path, option="shard") for path in shards]
    first = parts[0]
    for part in parts[1:]:
        for what, mine, theirs in (("tokenizer", part.fingerprint, first.fingerprint),
                                   ("max_seq_length", part.max_seq_length, first.max_seq_length),
                                   ("static_masking", part.record["static_masking"], first.record["static_masking"])):
            if mine != theirs:
                raise UserError(f"shard {part.path}: {what} differs from {first.path} ({mine} vs {theirs}); "
                                "shards must be prepared with the same options and --tokenizer")
    started = time.perf_counter()
    split_stats = {name: sum((SplitStats(**p.record["split_stats"][name]) for p in parts), SplitStats())
                   for name in SPLITS}
    corpus = {"files": 0, "input_bytes": 0, "documents": 0, "invalid_utf8_bytes": 0, "invalid_utf8_by_file": {},
              "skipped_files": []}
    for part in parts:
        for key, value in part.record["corpus"].items():
            corpus[key] = {**corpus[key], **value} if isinstance(value, dict) else corpus[key] + value
    with staged_output(output, overwrite) as staging:
        (staging / "dataset").mkdir()
        for name in SPLITS:
            sources = [path for part in parts for path in part.split_files()[name]]
            for number, source in enumerate(sources):
                _link_or_copy(source, staging / "dataset" / f"{name}-{number:05d}.arrow")
        save_tokenizer(first.tokenizer, staging)
        options = dict(first.record["options"], inputs=[str(p.path) for p in parts], output=str(output),
                       shard_index=0, num_shards=1)
        record = make_record(options, first.tokenizer, {"trained": False, "seconds": 0.0}, corpus, split_stats)
        record["combined_from"] = [str(p.path) for p in parts]
        record["seconds"] = round(time.perf_counter() - started, 2)
        (staging / "prepare.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
