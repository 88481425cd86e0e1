"""A prepared folder: its layout, its record (``prepare.json``) and reading it back.

Layout: ``tokenizer.json``, ``vocab.txt``, ``prepare.json`` and ``dataset/{split}-NNNNN.arrow``,
Arrow stream files that ``datasets.Dataset.from_file`` memory-maps. ``PreparedData`` reads
a folder for training, ``combine`` joins the folders of sharded runs, ``staged_output``
writes any of them so that an interrupted run never leaves one that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pyarrow as pa
from tokenizers import Tokenizer

import bertpre
from bertpre.corpus import CorpusStats
from bertpre.errors import UserError
from bertpre.outputs import staged_output
from bertpre.tokenizer import load_tokenizer, save_tokenizer, special_ids, vocab_fingerprint

SCHEMA_VERSION = 2  # 2: dataset/{split}-NNNNN.arrow files (1: a save_to_disk folder)
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


def make_record(options: dict, tokenizer: Tokenizer, tokenizer_record: dict, corpus: CorpusStats | dict,
                splits: dict[str, SplitStats]) -> dict:
    """The prepare.json record. It keeps the raw per-split counts, so records of shards can be
    added up (``bertpre combine``)."""
    corpus = corpus_counts(corpus) if isinstance(corpus, CorpusStats) else corpus
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
            "truncated_tokens": total.truncated_tokens,
            "truncated_token_fraction": round(total.truncated_tokens / max(total.pair_tokens, 1), 4),
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
    if s.get("truncated_token_fraction", 0) > 0.05:
        warnings.append(f"truncation to --max-seq-length dropped {s['truncated_tokens']} tokens of text, "
                        f"{100 * s['truncated_token_fraction']:.1f}% of what the pairs took (above 5%): pairs end with the "
                        "sentence that crosses the target length and are cut to --max-seq-length, as in Google's "
                        "BERT; a longer --max-seq-length loses less")
    requested = record["options"].get("vocab_size")
    if t["trained"] and requested and t["vocab_size"] < requested // 2:
        warnings.append(f"the trained vocabulary has {t['vocab_size']} entries, far fewer than --vocab-size "
                        f"{requested}: the corpus is too small to learn a vocabulary from")
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
        f"truncated {100 * s['truncated_fraction']:.1f}% of pairs, "
        f"{100 * s.get('truncated_token_fraction', 0):.1f}% of the text",
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
    with staged_output(output, overwrite, inputs=[p.path for p in parts]) as staging:
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
