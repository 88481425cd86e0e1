"""The on-disk format of a prepared folder: layout, Arrow encoding, record (``prepare.json``), reading.

Layout: ``tokenizer.json``, ``vocab.txt``, ``prepare.json`` and ``dataset/{split}-NNNNN.arrow``,
Arrow stream files (``arrow_schema``, written by ``encode_pairs`` and ``SplitFiles``) that
``datasets.Dataset.from_file`` memory-maps. ``PrepareRecord`` is ``prepare.json``,
``PreparedData`` reads a folder for training, ``combine`` joins the folders of sharded runs;
``staged_output`` writes any of them so that an interrupted run never leaves one that looks
complete. The pipeline that produces a folder is ``bertpre.data.prepare``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

import bertpre
from bertpre.data.corpus import CorpusCounts
from bertpre.data.tokenizer import load_tokenizer, save_tokenizer, special_ids, vocab_fingerprint
from bertpre.errors import UserError
from bertpre.outputs import staged_output

SCHEMA_VERSION = 3  # 3: prepare.json holds each value once; 2: dataset/{split}-NNNNN.arrow files (1: save_to_disk)
READABLE_SCHEMAS = (2, 3)  # the data files of 2 and 3 are the same
OUTPUT_FILE_BYTES = 1 << 29  # a split's next record batch goes to a new file after 512 MiB
SPLITS = ("train", "validation")
HISTOGRAM_BINS = 16


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
    truncated_tokens: int = 0  # corpus tokens cut from pairs to fit max_seq_length (lost text)
    pair_tokens: int = 0  # corpus tokens the pairs took, before that cut
    unpaired_tokens: int = 0  # sop: tokens of lone sentences (one-sentence documents, a last sentence) in no pair
    unpaired_documents: int = 0  # sop: documents of one sentence, which make no pair
    sequence_tokens: int = 0  # tokens of all sequences, [CLS] and [SEP] included (their fill of max_seq_length)
    length_counts: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)

    def __add__(self, other: SplitStats) -> SplitStats:
        counts = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "length_counts"}
        return SplitStats(**counts, length_counts=[a + b for a, b in zip(self.length_counts, other.length_counts)])



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



def histogram_edges(max_seq_length: int) -> list[int]:
    return [round(i * max_seq_length / HISTOGRAM_BINS) for i in range(HISTOGRAM_BINS)] + [max_seq_length + 1]


def arrow_schema(static_masking: bool, sentence_label: bool = True, word_boundaries: bool = False) -> pa.Schema:
    """The data files' columns; ``next_sentence_label`` (NotNext for nsp, swapped for sop) is
    absent for the ``none`` objective, ``word_continues`` (1 where a token continues the previous
    token's word) present only with a word segmenter."""
    fields = [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("token_type_ids", pa.list_(pa.int8())),
    ]
    if sentence_label:
        fields.append(pa.field("next_sentence_label", pa.int8()))
    if word_boundaries:
        fields.append(pa.field("word_continues", pa.list_(pa.int8())))
    if static_masking:
        fields += [
            pa.field("masked_lm_positions", pa.list_(pa.int32())),
            pa.field("masked_lm_ids", pa.list_(pa.int32())),
        ]
    return pa.schema(fields)



def encode_pairs(input_ids: np.ndarray, token_type_ids: np.ndarray, offsets: np.ndarray,
                 next_sentence_label: np.ndarray | None,
                 masked: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 word_continues: np.ndarray | None = None) -> pa.RecordBatch:
    """Sentence pairs -> one Arrow record batch in ``arrow_schema``'s layout.

    ``input_ids`` and ``token_type_ids`` are the pairs' tokens laid end to end, pair i at
    ``offsets[i]:offsets[i + 1]``; ``next_sentence_label`` is None for the ``none`` objective;
    ``masked`` (static masking) is ``(positions, original ids,
    offsets)`` of the masked tokens, laid out the same way; ``word_continues`` is laid out as
    ``input_ids``.
    """
    offsets32 = offsets.astype(np.int32)
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets32, input_ids.astype(np.int32)),
        "token_type_ids": pa.ListArray.from_arrays(offsets32, token_type_ids.astype(np.int8)),
    }
    if next_sentence_label is not None:
        columns["next_sentence_label"] = pa.array(next_sentence_label, type=pa.int8())
    if word_continues is not None:
        columns["word_continues"] = pa.ListArray.from_arrays(offsets32, word_continues.astype(np.int8))
    if masked is not None:
        positions, originals, mask_offsets = masked
        mask_offsets = mask_offsets.astype(np.int32)
        columns["masked_lm_positions"] = pa.ListArray.from_arrays(mask_offsets, positions.astype(np.int32))
        columns["masked_lm_ids"] = pa.ListArray.from_arrays(mask_offsets, originals.astype(np.int32))
    schema = arrow_schema(masked is not None, next_sentence_label is not None, word_continues is not None)
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def dataset_features(static_masking: bool, sentence_label: bool = True, word_boundaries: bool = False):
    import datasets

    schema = arrow_schema(static_masking, sentence_label, word_boundaries)
    return datasets.Features({f.name: _feature(f.type) for f in schema})


def _feature(arrow_type: pa.DataType):
    import datasets

    if pa.types.is_list(arrow_type):
        return datasets.List(datasets.Value(str(arrow_type.value_type)))
    return datasets.Value(str(arrow_type))


@dataclass
class PrepareRecord:
    """``prepare.json``: every value once. What can be computed from them (the sequence length,
    the NotNext share, the histogram's bin edges, ...) is a property, not a stored copy.

    ``splits`` keeps the raw per-split counts, so the records of shards add up (``bertpre combine``).
    """

    options: dict  # the run's options as given (PrepareOptions.to_json); max_seq_length under "pairs"
    tokenizer: dict  # vocab_size, fingerprint, special_ids, trained, and how it was trained
    corpus: CorpusCounts
    splits: dict[str, SplitStats]
    seconds: float = 0.0
    combined_from: list[str] = field(default_factory=list)
    bertpre_version: str = bertpre.__version__

    @classmethod
    def build(cls, options: dict, tokenizer: Tokenizer, tokenizer_record: dict, corpus: CorpusCounts,
              splits: dict[str, SplitStats]) -> PrepareRecord:
        described = {"vocab_size": tokenizer.get_vocab_size(), "fingerprint": vocab_fingerprint(tokenizer),
                     "special_ids": asdict(special_ids(tokenizer)), **tokenizer_record}
        return cls(options=options, tokenizer=described, corpus=corpus, splits=dict(splits))

    @classmethod
    def from_json(cls, data: dict, source: str) -> PrepareRecord:
        """Read schema 3 and schema 2 (same data files; its record held some values twice)."""
        try:
            version = data.get("schema_version")
            if version not in READABLE_SCHEMAS:
                readable = " and ".join(map(str, READABLE_SCHEMAS))
                raise UserError(f"{source}: prepared with schema version {version}, this bertpre reads versions "
                                f"{readable}; run `bertpre prepare` again")
            splits = data["splits"] if version == SCHEMA_VERSION else data["split_stats"]
            return cls(options=data["options"], tokenizer=data["tokenizer"],
                       corpus=CorpusCounts(**{f.name: data["corpus"][f.name] for f in fields(CorpusCounts)}),
                       splits={name: SplitStats(**splits[name]) for name in SPLITS},
                       seconds=data.get("seconds", 0.0), combined_from=data.get("combined_from", []),
                       bertpre_version=data["bertpre_version"])
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{source}: not a complete prepare record ({type(e).__name__}: {e})") from None

    @classmethod
    def read(cls, path: Path, label: str | None = None) -> PrepareRecord:
        """``path``'s record; errors name ``label`` (default: the path)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: not a prepare record (a JSON object)")
        return cls.from_json(data, label or str(path))

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "bertpre_version": self.bertpre_version,
                "seconds": self.seconds, "options": self.options, "tokenizer": self.tokenizer,
                "corpus": asdict(self.corpus), "splits": {name: asdict(s) for name, s in self.splits.items()},
                **({"combined_from": self.combined_from} if self.combined_from else {})}

    def write(self, folder: Path) -> None:
        (folder / "prepare.json").write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    # derived figures
    @property
    def max_seq_length(self) -> int:
        return self.options["pairs"]["max_seq_length"]

    @property
    def static_masking(self) -> bool:
        return self.options["static_masking"]

    @property
    def objective(self) -> str:
        """``nsp``, ``sop`` or ``none`` (records written before the option existed hold NSP pairs)."""
        return self.options["pairs"].get("objective", "nsp")

    @property
    def sentence_label(self) -> bool:
        return self.objective != "none"

    @property
    def word_segmenter(self) -> str | None:
        """The segmenter whose word boundaries the data stores (``word_continues``), if any."""
        return self.options.get("words", {}).get("segmenter")

    @property
    def total(self) -> SplitStats:
        return sum(self.splits.values(), SplitStats())

    def fraction(self, what: str) -> float:
        """A share of all pairs: ``not_next``, ``short_target`` or ``truncated``."""
        total = self.total
        return getattr(total, what) / max(total.instances, 1)

    @property
    def truncated_token_fraction(self) -> float:
        return self.total.truncated_tokens / max(self.total.pair_tokens, 1)

    @property
    def unk_rate(self) -> float:
        return self.total.unk_tokens / max(self.total.tokens, 1)

    @property
    def histogram_edges(self) -> list[int]:
        return histogram_edges(self.max_seq_length)


class PreparedData:
    """A folder written by ``bertpre prepare`` (or ``bertpre combine``): its record and tokenizer."""

    def __init__(self, path: str | Path, option: str = "data.path") -> None:
        self.path, self.option = Path(path), option
        record_path = self.path / "prepare.json"
        if not self.path.is_dir():
            raise UserError(f"{option} {self.path}: not found (run `bertpre prepare --output {self.path}` first)")
        if not record_path.is_file():
            raise UserError(f"{option} {self.path}: no prepare.json; not a folder written by `bertpre prepare`")
        self.record = PrepareRecord.read(record_path, label=f"{option} {self.path}")
        self.tokenizer: Tokenizer = load_tokenizer(self.path / "tokenizer.json")
        self.fingerprint = vocab_fingerprint(self.tokenizer)
        self.max_seq_length: int = self.record.max_seq_length

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
        info = datasets.DatasetInfo(features=dataset_features(self.record.static_masking, self.record.sentence_label,
                                                                    self.record.word_segmenter is not None))
        splits = {}
        for name, paths in files.items():
            if paths:
                try:
                    parts = [datasets.Dataset.from_file(str(p), info=info) for p in paths]
                except (OSError, pa.ArrowInvalid) as e:
                    raise UserError(f"{self.option} {self.path}: cannot read {name} data ({e})") from None
                for path, part in zip(paths, parts):
                    self._check_token_ids(path, part)
                splits[name] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return datasets.DatasetDict(splits)

    def _check_token_ids(self, path: Path, part) -> None:
        """Every token id of a data file lies in the tokenizer's vocabulary (one vectorised pass
        over the memory-mapped column), so a damaged or foreign file is refused before training."""
        import pyarrow.compute as pc

        ids = pc.list_flatten(part.data.column("input_ids"))
        if len(ids) == 0:
            return
        low, high = pc.min_max(ids).values()
        if low.as_py() < 0 or high.as_py() >= self.vocab_size:
            bad = low.as_py() if low.as_py() < 0 else high.as_py()
            raise UserError(f"{self.option} {self.path}: {path.name} holds token id {bad}, outside the tokenizer's "
                            f"vocabulary of {self.vocab_size}; the file is damaged or from another tokenizer "
                            "(run `bertpre prepare` again)")


def combine(shards: list[str], output: Path, overwrite: bool = False) -> dict:
    """``bertpre combine``: the outputs of sharded prepare runs -> one prepared folder.

    The shards must share the tokenizer, the sequence length and the masking mode; their
    splits are concatenated in the order given (files are hard-linked where the file system
    allows, else copied) and their statistics added up.
    """
    if len(shards) < 2:
        raise UserError("bertpre combine needs at least two prepared folders")
    parts = [PreparedData(path, option="shard") for path in shards]
    seen: dict[str, Path] = {}
    for part in parts:
        fingerprint = content_fingerprint(part)
        if fingerprint in seen:
            raise UserError(f"shard {part.path} holds the same data as shard {seen[fingerprint]}; "
                            "give each shard once")
        seen[fingerprint] = part.path
    first = parts[0]
    for part in parts[1:]:
        for what, mine, theirs in (("tokenizer", part.fingerprint, first.fingerprint),
                                   ("max_seq_length", part.max_seq_length, first.max_seq_length),
                                   ("static_masking", part.record.static_masking, first.record.static_masking),
                                   ("objective", part.record.objective, first.record.objective),
                                   ("word boundaries", part.record.options.get("words"),
                                    first.record.options.get("words"))):
            if mine != theirs:
                raise UserError(f"shard {part.path}: {what} differs from {first.path} ({mine} vs {theirs}); "
                                "shards must be prepared with the same options and --tokenizer")
    started = time.perf_counter()
    splits = {name: sum((p.record.splits[name] for p in parts), SplitStats()) for name in SPLITS}
    corpus = sum((p.record.corpus for p in parts), CorpusCounts())
    with staged_output(output, overwrite, inputs=[p.path for p in parts]) as staging:
        (staging / "dataset").mkdir()
        for name in SPLITS:
            sources = [path for part in parts for path in part.split_files()[name]]
            for number, source in enumerate(sources):
                _link_or_copy(source, staging / "dataset" / f"{name}-{number:05d}.arrow")
        save_tokenizer(first.tokenizer, staging)
        options = dict(first.record.options, inputs=[str(p.path) for p in parts], output=str(output),
                       shard_index=0, num_shards=1)
        record = PrepareRecord.build(options, first.tokenizer, {"trained": False, "seconds": 0.0}, corpus, splits)
        record.combined_from = [str(p.path) for p in parts]
        record.seconds = round(time.perf_counter() - started, 2)
        record.write(staging)
    return record


def content_fingerprint(prepared: PreparedData) -> str:
    """What identifies a prepared folder's content, wherever it lies: its record and, per data
    file, the size and the first MiB (a copied or linked shard gives the same value)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update((prepared.path / "prepare.json").read_bytes())
    for name, paths in prepared.split_files().items():
        for path in paths:
            digest.update(f"{name}:{path.stat().st_size}".encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 20))
    return digest.hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
