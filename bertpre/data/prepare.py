"""``bertpre prepare``: raw text -> tokenizer + sentence-pair dataset on disk.

Flow: input files -> documents (corpus.py) -> train/validation by document -> blocks of
documents -> token ids -> sentence pairs (pairs.py) -> Arrow record batches -> Arrow
files ``dataset/{split}-NNNNN.arrow``, plus ``prepare.json`` and the tokenizer.

Memory is bounded by the block size: documents are tokenized and paired one block at a
time, in ``num_proc`` processes, and NotNext partners are drawn from the same block.
Output files are written batch by batch and never read back. Everything is written into a
staging folder that is renamed to the output only once complete.

The folder's layout, record and reader live in ``bertpre.data.prepared``.
"""

from __future__ import annotations

import collections
import ctypes
import math
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer
from tqdm import tqdm

from bertpre.data.corpus import CorpusOptions, CorpusStats, expand_inputs, input_size, read_documents
from bertpre.data.masking import Masker, check_max_ngram, default_max_predictions
from bertpre.data.pairs import Document, Instance, PairOptions, create_instances, encode_instance
from bertpre.data.prepared import (
    SPLITS,
    PrepareRecord,
    SplitFiles,
    SplitStats,
    arrow_schema,
    encode_pairs,
    histogram_edges,
)
from bertpre.data.tokenizer import (
    SentenceEncoder,
    check_vocab_size,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    train_tokenizer,
    vocab_fingerprint,
)
from bertpre.data.words import WordBoundaries, WordOptions
from bertpre.errors import UserError
from bertpre.outputs import staged_output

BLOCK_CHARS = 2_000_000  # characters of text paired together (about 500k tokens); bounds memory
# With a word segmenter, a token's "continues the previous token's word" flag travels through pair-making in
# this bit of its id (pairs.py only cuts and joins id arrays), and is taken out again when the batch is written.
WORD_FLAG_BIT = 30


@dataclass
class PrepareOptions:
    inputs: list[str]
    output: Path
    corpus: CorpusOptions = field(default_factory=CorpusOptions)
    pairs: PairOptions = field(default_factory=PairOptions)
    words: WordOptions = field(default_factory=WordOptions)
    tokenizer: str | None = None
    vocab_size: int = 30522
    cased: bool = False
    seed: int = 12345
    validation_fraction: float = 0.05
    dupe_factor: int = 1
    static_masking: bool = False
    whole_word_masking: bool = False
    max_ngram: int = 1
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
        if self.tokenizer is None:
            check_vocab_size(self.vocab_size)
        if self.dupe_factor < 1:
            raise UserError(f"--dupe-factor must be at least 1, got {self.dupe_factor}")
        for flag, used in (("--whole-word-masking", self.whole_word_masking), ("--max-ngram", self.max_ngram != 1)):
            if used and not self.static_masking:
                raise UserError(f"{flag} at prepare time needs --static-masking (with dynamic masking, set "
                                f"data.{flag[2:].replace('-', '_')} in the training config)")
        check_max_ngram(self.max_ngram, "--max-ngram")

    def to_json(self) -> dict:
        record = asdict(self)
        record["output"] = str(self.output)
        record["words"] = self.words.to_json()
        return record


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
        self.boundaries = WordBoundaries(tokenizer, options.words) if options.words.segmenter else None
        assert tokenizer.get_vocab_size() < 1 << WORD_FLAG_BIT, "ids must leave WORD_FLAG_BIT free"
        self.masker = (
            Masker.from_tokenizer(tokenizer, default_max_predictions(options.pairs.max_seq_length),
                                  whole_word=options.whole_word_masking, max_ngram=options.max_ngram)
            if options.static_masking
            else None
        )

    def __call__(self, block: TextBlock) -> tuple[str, list[pa.RecordBatch], SplitStats]:
        stats = SplitStats()
        documents = self._tokenize(block.documents, stats)
        dupes = self.options.dupe_factor if block.split == "train" else 1
        batches = []
        o = self.options
        for dupe in range(dupes):
            rng = random.Random(f"{o.seed}:{o.shard_index}:{block.split}:{block.index}:{dupe}")
            instances = list(create_instances(documents, o.pairs, rng, self.special.sep))
            if dupe == 0 and o.pairs.objective == "sop":  # the text no sentence-order pair holds
                stats.unpaired_tokens += sum(len(s) for d in documents for s in d) - sum(
                    inst.corpus_tokens for inst in instances)
                stats.unpaired_documents += sum(len(d) == 1 for d in documents)
            rng.shuffle(instances)
            mask_rng = np.random.default_rng([o.seed, o.shard_index, SPLITS.index(block.split), block.index, dupe])
            batches.append(self._record_batch(instances, mask_rng, stats))
        return block.split, batches, stats

    def _tokenize(self, documents: list[list[str]], stats: SplitStats) -> list[Document]:
        """Token-id documents; sentences and documents without tokens are dropped, and a sentence
        longer than a pair can hold is split into pieces that fit (truncation would drop the rest)."""
        texts = [s for d in documents for s in d]
        if self.boundaries is None:
            ids, counts = self.encoder.encode(texts)
        else:
            ids, counts, continues = self.boundaries.encode(texts)
        stats.unk_tokens += int(np.count_nonzero(ids == self.special.unk))
        if self.boundaries is not None:
            ids = ids | (continues.astype(np.int32) << WORD_FLAG_BIT)
        sentences = np.split(ids, np.cumsum(counts)[:-1]) if len(counts) else []
        limit, piece = self.options.pairs.max_num_tokens, max(1, self.options.pairs.max_num_tokens // 4)
        out, at = [], 0
        for document in documents:
            # a sentence over the limit becomes even pieces of about a quarter of it, sentence-sized, so that
            # chunks of several pieces make IsNext pairs and lose no more to the final cut than sentences do
            tokenized = [part for s, n in zip(sentences[at : at + len(document)], counts[at : at + len(document)]) if n
                         for part in (np.array_split(s, -(-n // piece)) if n > limit else (s,))]
            at += len(document)
            if tokenized:
                out.append(tokenized)
                stats.documents += 1
                stats.sentences += len(tokenized)
        stats.tokens += int(counts.sum())
        return out

    def _record_batch(self, instances: list[Instance], mask_rng: np.random.Generator,
                      stats: SplitStats) -> pa.RecordBatch:
        encoded = [encode_instance(inst, self.special.cls, self.special.sep) for inst in instances]
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        input_ids = np.concatenate([ids for ids, _ in encoded]) if encoded else np.zeros(0, np.int32)
        token_type_ids = np.concatenate([types for _, types in encoded]) if encoded else np.zeros(0, np.int8)
        labels = np.array([inst.is_random_next for inst in instances], dtype=np.int8) \
            if self.options.pairs.has_sentence_label else None
        _count(stats, instances, lengths, self.options.pairs.max_seq_length)
        word_continues = None
        if self.boundaries is not None:
            word_continues = (input_ids >> WORD_FLAG_BIT).astype(np.int8)
            input_ids &= (1 << WORD_FLAG_BIT) - 1
        # static masking masks input_ids in place
        masked = self._static_masks(input_ids, offsets, mask_rng, word_continues) if self.masker is not None else None
        return encode_pairs(input_ids, token_type_ids, offsets, labels, masked, word_continues)

    def _static_masks(self, flat_ids: np.ndarray, offsets: np.ndarray, rng: np.random.Generator,
                      word_continues: np.ndarray | None) -> tuple:
        """Mask ``flat_ids`` in place; return the masked positions, their original ids and the offsets
        of each instance's share of them."""
        assert self.masker is not None
        chosen = [self.masker.choose_positions(flat_ids[s:e], rng, None if word_continues is None else word_continues[s:e])
                  for s, e in zip(offsets[:-1], offsets[1:])]
        counts = np.array([len(c) for c in chosen], dtype=np.int64)
        positions = np.concatenate(chosen).astype(np.int32) if chosen else np.zeros(0, np.int32)
        flat_cols = positions + np.repeat(offsets[:-1], counts)
        view = flat_ids.reshape(1, -1)
        originals = self.masker.apply(view, np.zeros(len(flat_cols), dtype=np.int64), flat_cols, rng)
        return positions, originals, np.concatenate([[0], np.cumsum(counts)])


def _count(s: SplitStats, instances: list[Instance], lengths: np.ndarray, max_seq_length: int) -> None:
    s.instances += len(instances)
    s.not_next += sum(inst.is_random_next for inst in instances)
    s.short_target += sum(inst.short_target for inst in instances)
    s.truncated += sum(inst.truncated > 0 for inst in instances)
    s.truncated_tokens += sum(inst.dropped for inst in instances)
    s.pair_tokens += sum(inst.corpus_tokens for inst in instances)
    s.sequence_tokens += int(lengths.sum())
    counts, _ = np.histogram(lengths, bins=histogram_edges(max_seq_length))
    s.length_counts = [a + int(b) for a, b in zip(s.length_counts, counts)]


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
        context.set_forkserver_preload(["bertpre.data.prepare"])
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


def prepare(options: PrepareOptions) -> PrepareRecord:
    """Run the whole preparation; returns the record also written to ``prepare.json``."""
    files = expand_inputs(options.inputs)
    started = time.perf_counter()
    sources = [*options.inputs, *files, *([options.tokenizer] if options.tokenizer else [])]
    with staged_output(options.output, options.overwrite, inputs=sources) as staging:
        record = _prepare_into(staging, options, files)
        record.seconds = round(time.perf_counter() - started, 2)
        record.write(staging)
    return record


def write_tokenizer(inputs: list[str], output: Path, corpus: CorpusOptions, vocab_size: int, cased: bool,
                    sample_mb: float, seed: int, overwrite: bool) -> dict:
    """``bertpre tokenizer``: train a tokenizer alone (for sharded preparation) into ``output``."""
    check_vocab_size(vocab_size)
    files = expand_inputs(inputs)
    with staged_output(output, overwrite, inputs=[*inputs, *files]) as staging:
        tokenizer, record = build_tokenizer(files, corpus, vocab_size, cased, sample_mb, seed)
        save_tokenizer(tokenizer, staging)
    return {"vocab_size": tokenizer.get_vocab_size(), "fingerprint": vocab_fingerprint(tokenizer), **record}


def _prepare_into(staging: Path, options: PrepareOptions, files: list[Path]) -> PrepareRecord:
    tokenizer, tokenizer_record = _obtain_tokenizer(options, files)
    save_tokenizer(tokenizer, staging)
    (staging / "dataset").mkdir()
    schema = arrow_schema(options.static_masking, options.pairs.has_sentence_label, options.words.segmenter is not None)
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
        if options.pairs.objective == "sop" and stats["train"].unpaired_documents:
            raise UserError("--objective sop: no training pairs, every training document has a single sentence "
                            "(sentence-order pairs need two sentences of one document); use --objective none, or "
                            "a corpus of longer documents")
        raise UserError("no training pairs: every document went to validation; lower --validation-fraction")
    return PrepareRecord.build(options.to_json(), tokenizer, tokenizer_record, corpus_stats.counts(), stats)


def shard_files(files: list[Path], options: PrepareOptions) -> list[Path]:
    """The input files of this shard: every num_shards-th file from shard_index on."""
    if options.num_shards == 1:
        return files
    if len(files) < options.num_shards:
        raise UserError(f"--num-shards {options.num_shards} is more than the {len(files)} input files "
                        "(shards are made of whole files)")
    return files[options.shard_index :: options.num_shards]


