"""Hostile inputs across prepare, train, export, import and finetune: each gets one exact error
line (exit status 2, no traceback) and leaves nothing written, or overwritten, behind."""

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from bertpre.cli import main

TINY = str(ROOT / "configs" / "bert-tiny.yaml")
SST2_CONFIG = str(ROOT / "configs" / "finetune-sst2.yaml")


@dataclass
class Case:
    name: str
    argv: list[str]  # {tmp}, {data}, {ckpt} are filled in
    message: str  # the whole error line after "bertpre CMD: error: "
    setup: dict[str, bytes | str] | None = None  # files to create under {tmp}
    absent: tuple[str, ...] = ()  # must not exist afterwards
    unchanged: tuple[str, ...] = ()  # must keep their content


def prepare_args(*extra: str) -> list[str]:
    return ["prepare", "--input", "{tmp}/corpus.txt", "--output", "{tmp}/out", *extra]


def train_args(*extra: str) -> list[str]:
    return ["train", "--config", TINY, "--data.path", "{data}", "--trainer.default_root_dir", "{tmp}/run",
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", *extra]


TEXT = "One sentence here. Another sentence there.\n\nA second document. It has two sentences.\n"

CASES = [
    Case("empty file", prepare_args(), "no text found in the inputs (1 files): the corpus is empty",
         {"corpus.txt": ""}, absent=("out", ".out.partial")),
    Case("binary file", prepare_args(),
         "{tmp}/corpus.txt: binary file (contains NUL bytes), not text (--skip-unreadable skips such files)",
         {"corpus.txt": b"\x7fELF\x02\x01\x01\x00\x00\x00"}, absent=("out",)),
    Case("truncated gzip", ["prepare", "--input", "{tmp}/corpus.txt.gz", "--output", "{tmp}/out"],
         "{tmp}/corpus.txt.gz: cannot read: Compressed file ended before the end-of-stream marker was reached "
         "(--skip-unreadable skips such files)",
         {"corpus.txt.gz": gzip.compress(TEXT.encode() * 50)[:60]}, absent=("out",)),
    Case("JSONL line that is not JSON", ["prepare", "--input", "{tmp}/c.jsonl", "--output", "{tmp}/out"],
         "{tmp}/c.jsonl:2: not valid JSON (Expecting value)",
         {"c.jsonl": '{"text": "Fine."}\nnot json\n'}, absent=("out",)),
    Case("JSONL without the text field", ["prepare", "--input", "{tmp}/c.jsonl", "--output", "{tmp}/out"],
         "{tmp}/c.jsonl:1: no field 'text' (set --text-field)", {"c.jsonl": '{"body": "Fine."}\n'}, absent=("out",)),
    Case("input that does not exist", ["prepare", "--input", "{tmp}/nowhere/*.txt", "--output", "{tmp}/out"],
         "input not found: {tmp}/nowhere/*.txt", absent=("out",)),
    Case("tokenizer file that is not one", prepare_args("--tokenizer", "{tmp}/tokenizer.json"),
         "--tokenizer {tmp}/tokenizer.json: not a tokenizers JSON file (expected ident at line 1 column 2)",
         {"corpus.txt": TEXT, "tokenizer.json": "this is not json"}, absent=("out",)),
    Case("vocabulary without [MASK]", prepare_args("--tokenizer", "{tmp}/vocab.txt"),
         "--tokenizer {tmp}/vocab.txt: vocabulary has no [MASK] token",
         {"corpus.txt": TEXT, "vocab.txt": "[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n"}, absent=("out",)),
    Case("zero vocabulary size", prepare_args("--vocab-size", "0"), "--vocab-size must be at least 105, got 0",
         {"corpus.txt": TEXT}, absent=("out",)),
    Case("negative sequence length", prepare_args("--max-seq-length", "-5"),
         "--max-seq-length must be at least 8, got -5", {"corpus.txt": TEXT}, absent=("out",)),
    Case("zero processes", prepare_args("--num-proc", "0"), "--num-proc must be at least 1, got 0",
         {"corpus.txt": TEXT}, absent=("out",)),
    Case("zero dupe factor", prepare_args("--dupe-factor", "0"), "--dupe-factor must be at least 1, got 0",
         {"corpus.txt": TEXT}, absent=("out",)),
    Case("bad document separator", prepare_args("--doc-separator", "(unclosed"),
         "--doc-separator is not a valid regular expression: missing ), unterminated subpattern at position 0",
         {"corpus.txt": TEXT}, absent=("out",)),
    Case("output folder in use", prepare_args(),
         "--output {tmp}/out exists and is not empty (use --overwrite to replace it)",
         {"corpus.txt": TEXT, "out/precious.txt": "keep me"}, unchanged=("out/precious.txt",)),
    Case("config with an unknown key", train_args("--model.hidden_sise", "64"),
         "unrecognized arguments: --model.hidden_sise 64", absent=("run",)),
    Case("config value of the wrong type", train_args("--data.batch_size", "many"),
         "Parser key \"data.batch_size\": Expected a <class 'int'>. Got value: many", absent=("run",)),
    Case("zero batch size", train_args("--data.batch_size", "0"), "data.batch_size must be at least 1, got 0",
         absent=("run",)),
    Case("negative learning rate", train_args("--model.learning_rate=-1e-3"),
         "model.learning_rate must be positive, got -0.001", absent=("run",)),
    Case("sequence length above the position table", train_args("--model.config.max_position_embeddings", "32"),
         "{data} was prepared with max_seq_length 64, above model.config.max_position_embeddings 32",
         absent=("run/checkpoints",)),
    Case("prepared folder from an older schema", train_args("--data.path", "{tmp}/old"),
         "data.path {tmp}/old: prepared with schema version 1, this bertpre reads version 2; run `bertpre prepare` "
         "again", absent=("run/checkpoints",)),
    Case("folder that was never prepared", train_args("--data.path", "{tmp}"),
         "data.path {tmp}: no prepare.json; not a folder written by `bertpre prepare`", absent=("run/checkpoints",)),
    Case("checkpoint path that does not exist", train_args("--ckpt_path", "{tmp}/missing.ckpt"),
         "ckpt_path {tmp}/missing.ckpt: not found", absent=("run/checkpoints",)),
    Case("export of a text file", ["export", "{tmp}/notes.ckpt", "--output", "{tmp}/hf"],
         "checkpoint {tmp}/notes.ckpt: not a readable checkpoint (not an archive written by torch.save)", {"notes.ckpt": "just text"},
         absent=("hf", ".hf.partial")),
    Case("export of another architecture's checkpoint", ["export", "{tmp}/other.ckpt", "--output", "{tmp}/hf"],
         "checkpoint {tmp}/other.ckpt: not a bertpre checkpoint (no 'bertpre' entry)", absent=("hf",)),
    Case("import of a folder without a model", ["import", "{tmp}", "--output", "{tmp}/imported.ckpt"],
         "{tmp}: no config.json; not a HuggingFace model directory", absent=("imported.ckpt",)),
    Case("fine-tuning without the label column",
         ["finetune", "--config", SST2_CONFIG, "--model.pretrained", "{ckpt}", "--data.train_file", "{tmp}/t.tsv",
          "--data.validation_file", "{tmp}/t.tsv", "--trainer.default_root_dir", "{tmp}/ft"],
         "{tmp}/t.tsv: no column 'label' (columns: sentence, score; set data.label_column)",
         {"t.tsv": "sentence\tscore\na fine film\t1\n"}, absent=("ft/checkpoints",)),
    Case("fine-tuning with a single class",
         ["finetune", "--config", SST2_CONFIG, "--model.pretrained", "{ckpt}", "--data.train_file", "{tmp}/t.tsv",
          "--data.validation_file", "{tmp}/t.tsv", "--trainer.default_root_dir", "{tmp}/ft"],
         "{tmp}/t.tsv: column 'label' has a single class ['1']",
         {"t.tsv": "sentence\tlabel\na fine film\t1\nanother\t1\n"}, absent=("ft/checkpoints",)),
]


@pytest.fixture(scope="module")
def pretrained(sample_checkpoint) -> Path:
    return sample_checkpoint


def test_there_are_at_least_twenty_hostile_inputs():
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)
    assert {c.argv[0] for c in CASES} >= {"prepare", "train", "export", "import", "finetune"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, sample_prepared, pretrained, tmp_path, capsys):
    for name, content in (case.setup or {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.name == "prepared folder from an older schema":
        shutil.copytree(sample_prepared, tmp_path / "old")
        record = json.loads((tmp_path / "old" / "prepare.json").read_text())
        (tmp_path / "old" / "prepare.json").write_text(json.dumps({**record, "schema_version": 1}))
    if case.name == "export of another architecture's checkpoint":
        torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}, "epoch": 1}, tmp_path / "other.ckpt")
    before = {name: (tmp_path / name).read_bytes() for name in case.unchanged}
    fill = {"tmp": str(tmp_path), "data": str(sample_prepared), "ckpt": str(pretrained)}
    argv = [a.format(**fill) for a in case.argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"bertpre {argv[0]}: error: " + case.message.format(**fill)
    for name in case.absent:
        assert not (tmp_path / name).exists(), f"{name} was written"
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content, f"{name} was changed"


ACCEPTED = [  # inputs that work but deserve a warning in the summary
    ("documents of one sentence", "".join(f"Sentence number {i} stands alone.\n\n" for i in range(400)).encode(),
     "warning: 100.0% of pairs are NotNext, not 50%: most chunks hold one sentence (documents of one sentence, or "
     "sentences longer than --max-seq-length), and a one-sentence chunk always gets a random B"),
    ("a single document", ("A first sentence here. " * 400).encode(),
     "warning: only one document: NotNext partners come from that same document"),
    ("invalid UTF-8", b"Caf\xe9 au lait is fine. " * 50 + b"\n\nAnother \xff document. " * 50,
     "warning: 100 bytes were not valid UTF-8 and were replaced (per file in prepare.json)"),
]


@pytest.mark.parametrize("name, content, warning", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_odd_but_usable_input_is_prepared_with_a_warning(name, content, warning, sample_prepared, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_bytes(content)
    main(["prepare", "--input", str(tmp_path / "corpus.txt"), "--output", str(tmp_path / "out"), "--tokenizer",
          str(sample_prepared), "--validation-fraction", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert f"  {warning}" in lines
