"""Hostile inputs across prepare, train, export, import and finetune: each gets one exact error
line (exit status 2, no traceback) and leaves nothing written, or overwritten, behind."""

import gzip
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from bertpre.cli import main
from bertpre.data.prepared import PreparedData

TINY = str(ROOT / "configs" / "bert-tiny.yaml")
SST2_CONFIG = str(ROOT / "configs" / "finetune-sst2.yaml")


@dataclass
class Case:
    name: str
    argv: list[str]  # {tmp}, {data}, {ckpt} are filled in
    message: str  # the whole error line after "bertpre CMD: error: "; {detail}: a library's own words, not pinned
    setup: dict[str, bytes | str] | None = None  # files to create under {tmp}
    absent: tuple[str, ...] = ()  # must not exist afterwards
    unchanged: tuple[str, ...] = ()  # must keep their content


def finetune_args(*extra: str) -> list[str]:
    return ["finetune", "--config", SST2_CONFIG, "--model.pretrained", "{ckpt}", "--data.train_file", "{tmp}/t.tsv",
            "--data.validation_file", "{tmp}/v.tsv", "--trainer.default_root_dir", "{tmp}/ft", *extra]


def predict_args(*extra: str) -> list[str]:
    return ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/t.tsv", *extra]


LABELLED = "sentence\tlabel\na fine film\t1\na dull film\t0\n"


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
         "{tmp}/c.jsonl:2: not valid JSON ({detail})",
         {"c.jsonl": '{"text": "Fine."}\nnot json\n'}, absent=("out",)),
    Case("JSONL without the text field", ["prepare", "--input", "{tmp}/c.jsonl", "--output", "{tmp}/out"],
         "{tmp}/c.jsonl:1: no field 'text' (set --text-field)", {"c.jsonl": '{"body": "Fine."}\n'}, absent=("out",)),
    Case("input that does not exist", ["prepare", "--input", "{tmp}/nowhere/*.txt", "--output", "{tmp}/out"],
         "input not found: {tmp}/nowhere/*.txt", absent=("out",)),
    Case("tokenizer file that is not one", prepare_args("--tokenizer", "{tmp}/tokenizer.json"),
         "--tokenizer {tmp}/tokenizer.json: not a tokenizers JSON file ({detail})",
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
         "{detail}--model.hidden_sise 64", absent=("run",)),
    Case("config value of the wrong type", train_args("--data.batch_size", "many"),
         "{detail}data.batch_size{detail}many{detail}", absent=("run",)),
    Case("zero batch size", train_args("--data.batch_size", "0"), "data.batch_size must be at least 1, got 0",
         absent=("run",)),
    Case("negative learning rate", train_args("--model.learning_rate=-1e-3"),
         "model.learning_rate must be positive, got -0.001", absent=("run",)),
    Case("sequence length above the position table", train_args("--model.config.max_position_embeddings", "32"),
         "{data} was prepared with max_seq_length 64, above model.config.max_position_embeddings 32",
         absent=("run/checkpoints",)),
    Case("prepared folder from an older schema", train_args("--data.path", "{tmp}/old"),
         "data.path {tmp}/old: prepared with schema version 1, this bertpre reads versions 2 and 3; run "
         "`bertpre prepare` again", absent=("run/checkpoints",)),
    Case("folder that was never prepared", train_args("--data.path", "{tmp}"),
         "data.path {tmp}: no prepare.json; not a folder written by `bertpre prepare`", absent=("run/checkpoints",)),
    Case("checkpoint path that does not exist", train_args("--ckpt_path", "{tmp}/missing.ckpt"),
         "ckpt_path {tmp}/missing.ckpt: not found", absent=("run/checkpoints",)),
    Case("export of a text file", ["export", "{tmp}/notes.ckpt", "--output", "{tmp}/hf"],
         "checkpoint {tmp}/notes.ckpt: not a readable checkpoint (not an archive written by torch.save)", {"notes.ckpt": "just text"},
         absent=("hf", ".hf.partial")),
    Case("export of another architecture's checkpoint", ["export", "{tmp}/other.ckpt", "--output", "{tmp}/hf"],
         "checkpoint {tmp}/other.ckpt: not a bertpre pretraining or fine-tuning checkpoint (no 'bertpre' or "
         "'bertpre_task' entry)", absent=("hf",)),
    Case("import of a folder without a model", ["import", "{tmp}/hf", "--output", "{tmp}/imported.ckpt"],
         "{tmp}/hf: no config.json; not a HuggingFace model directory", {"hf/README.md": "no model here"},
         absent=("imported.ckpt",)),
    Case("fine-tuning without the label column",
         ["finetune", "--config", SST2_CONFIG, "--model.pretrained", "{ckpt}", "--data.train_file", "{tmp}/t.tsv",
          "--data.validation_file", "{tmp}/t.tsv", "--trainer.default_root_dir", "{tmp}/ft"],
         "{tmp}/t.tsv: no column 'label' (columns: sentence, score; set data.label_column)",
         {"t.tsv": "sentence\tscore\na fine film\t1\n"}, absent=("ft/checkpoints",)),
    # --- what the user owns is never destroyed ---
    Case("prepare output that is the input", ["prepare", "--input", "{tmp}/c", "--output", "{tmp}/c", "--overwrite"],
         "--output {tmp}/c is the input {tmp}/c; write the output elsewhere", {"c/book.txt": TEXT},
         unchanged=("c/book.txt",)),
    Case("prepare output that contains the input",
         ["prepare", "--input", "{tmp}/c/books", "--output", "{tmp}/c", "--overwrite"],
         "--output {tmp}/c contains the input {tmp}/c/books; write the output elsewhere", {"c/books/book.txt": TEXT},
         unchanged=("c/books/book.txt",)),
    Case("prepare output inside the input", ["prepare", "--input", "{tmp}/c", "--output", "{tmp}/c/out"],
         "--output {tmp}/c/out lies inside the input {tmp}/c; write the output elsewhere", {"c/book.txt": TEXT},
         absent=("c/out",), unchanged=("c/book.txt",)),
    Case("tokenizer output that is the input", ["tokenizer", "--input", "{tmp}/c", "--output", "{tmp}/c", "--overwrite"],
         "--output {tmp}/c is the input {tmp}/c; write the output elsewhere", {"c/book.txt": TEXT},
         unchanged=("c/book.txt",)),
    Case("fresh training over another run's checkpoints", train_args(),
         "{tmp}/run/checkpoints holds checkpoints of an earlier run (last.ckpt, ...); resume it with --ckpt_path "
         "last, choose another trainer.default_root_dir, or pass --overwrite true to delete them and start afresh",
         {"run/checkpoints/last.ckpt": b"an earlier run's weights"}, unchanged=("run/checkpoints/last.ckpt",)),
    Case("import over an existing checkpoint", ["import", "{tmp}/hf", "--output", "{tmp}/old.ckpt"],
         "--output {tmp}/old.ckpt exists (use --overwrite to replace it)",
         {"hf/config.json": "{}", "old.ckpt": b"precious"}, unchanged=("old.ckpt",)),
    Case("predict output that is its input", predict_args("--output", "{tmp}/t.tsv"),
         "--output {tmp}/t.tsv is the input {tmp}/t.tsv; write the output elsewhere", {"t.tsv": LABELLED},
         unchanged=("t.tsv",)),
    Case("predict over an existing file", predict_args("--output", "{tmp}/p.tsv"),
         "--output {tmp}/p.tsv exists (use --overwrite to replace it)", {"t.tsv": LABELLED, "p.tsv": "mine"},
         unchanged=("p.tsv",)),
    Case("export over a file", ["export", "{ckpt}", "--output", "{tmp}/hf"], "--output {tmp}/hf is a file; name a folder",
         {"hf": "notes"}, unchanged=("hf",)),
    Case("export over an exported folder", ["export", "{ckpt}", "--output", "{tmp}/hf"],
         "--output {tmp}/hf exists and is not empty (use --overwrite to replace it)", {"hf/config.json": "{}"},
         unchanged=("hf/config.json",)),
    Case("combine output that is a shard", ["combine", "{tmp}/a", "{tmp}/b", "--output", "{tmp}/a", "--overwrite"],
         "--output {tmp}/a is the input {tmp}/a; write the output elsewhere", absent=("a/dataset/train-00002.arrow",)),
    # --- silently wrong before ---
    Case("combine given the same shard twice", ["combine", "{tmp}/a", "{tmp}/a_copy", "--output", "{tmp}/c"],
         "shard {tmp}/a_copy holds the same data as shard {tmp}/a; give each shard once", absent=("c",)),
    Case("training data smaller than one batch", train_args("--data.batch_size", "100000"),
         "data.path {data}: the train split holds {train_pairs} pairs, fewer than one batch (data.batch_size 100000 x "
         "1 devices); lower data.batch_size or prepare more text", absent=("run/checkpoints",)),
    Case("predict with a negative batch size", predict_args("--output", "{tmp}/p.tsv", "--batch-size", "-1"),
         "--batch-size must be at least 1, got -1", {"t.tsv": LABELLED}, absent=("p.tsv",)),
    # --- one line, not a traceback ---
    Case("vocabulary size beyond memory", prepare_args("--vocab-size", "1000000000"),
         "--vocab-size must be at most 1048576, got 1000000000 (the WordPiece trainer's memory grows with it; BERT "
         "vocabularies hold 30k-120k entries)", {"corpus.txt": TEXT}, absent=("out", ".out.partial")),
    Case("fine-tuning validation file without the label column", finetune_args(),
         "{tmp}/v.tsv: no column 'label' (columns: sentence; set data.label_column)",
         {"t.tsv": LABELLED, "v.tsv": "sentence\na fine film\n"}, absent=("ft/checkpoints",)),
    Case("TSV row with fewer fields", finetune_args(), "{tmp}/t.tsv:3: 1 fields, but the header has 2",
         {"t.tsv": "sentence\tlabel\na fine film\t1\na dull film\n", "v.tsv": LABELLED}, absent=("ft/checkpoints",)),
    Case("fine-tuning sequence length beyond the encoder", finetune_args("--data.max_seq_length", "1000"),
         "data.max_seq_length 1000 is above the encoder's max_position_embeddings 512",
         {"t.tsv": LABELLED, "v.tsv": LABELLED}, absent=("ft/checkpoints",)),
    Case("fine-tuning with batch size zero", finetune_args("--data.batch_size", "0"),
         "data.batch_size must be at least 1, got 0", {"t.tsv": LABELLED, "v.tsv": LABELLED},
         absent=("ft/checkpoints",)),
    Case("predict with batch size zero", predict_args("--output", "{tmp}/p.tsv", "--batch-size", "0"),
         "--batch-size must be at least 1, got 0", {"t.tsv": LABELLED}, absent=("p.tsv",)),
    Case("predict output that is a folder", predict_args("--output", "{tmp}/outdir"),
         "--output {tmp}/outdir is a folder; name a file", {"t.tsv": LABELLED, "outdir/x": "x"},
         absent=("outdir.partial",), unchanged=("outdir/x",)),
    Case("import output that is a folder", ["import", "{tmp}/hf", "--output", "{tmp}/dir"],
         "--output {tmp}/dir is a folder; name a file", {"hf/config.json": "{}", "dir/x": "x"}, unchanged=("dir/x",)),
    Case("import of a truncated model.safetensors", ["import", "{tmp}/hf", "--output", "{tmp}/imported.ckpt"],
         "{tmp}/hf/model.safetensors: not a readable safetensors file (truncated or damaged)",
         {"hf/config.json": json.dumps({"model_type": "bert", "vocab_size": 100, "hidden_size": 8,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}),
          "hf/model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\""}, absent=("imported.ckpt",)),
    Case("inspect figure that is not an image", ["inspect", "{data}", "--plot", "{tmp}/r.txt"],
         "--plot {tmp}/r.txt: not an image file name (use .png, .pdf or .svg)", absent=("r.txt",)),
    Case("export output that is the checkpoint", ["export", "{tmp}/model.ckpt", "--output", "{tmp}/model.ckpt",
                                                  "--overwrite"],
         "--output {tmp}/model.ckpt is the input {tmp}/model.ckpt; write the output elsewhere",
         unchanged=("model.ckpt",)),
    Case("import output that is the input folder", ["import", "{tmp}/hf", "--output", "{tmp}/hf", "--overwrite"],
         "--output {tmp}/hf is the input {tmp}/hf; write the output elsewhere", {"hf/config.json": "{}"},
         unchanged=("hf/config.json",)),
    Case("tokenizer output over a file", ["tokenizer", "--input", "{tmp}/corpus.txt", "--output", "{tmp}/tok",
                                          "--overwrite"],
         "--output {tmp}/tok is a file; name a folder", {"corpus.txt": TEXT, "tok": "my notes"}, unchanged=("tok",)),
    Case("combine over a folder in use", ["combine", "{tmp}/a", "{tmp}/b", "--output", "{tmp}/c"],
         "--output {tmp}/c exists and is not empty (use --overwrite to replace it)", {"c/mine.txt": "keep"},
         unchanged=("c/mine.txt",)),
    Case("combine of a single shard", ["combine", "{tmp}/a", "--output", "{tmp}/c"],
         "bertpre combine needs at least two prepared folders", absent=("c",)),
    Case("predict with a pretraining checkpoint", predict_args("--output", "{tmp}/p.tsv"),
         "checkpoint {ckpt}: not a `bertpre finetune` checkpoint (no 'bertpre_task' entry)", {"t.tsv": LABELLED},
         absent=("p.tsv",)),
    Case("inspect of a folder that was never prepared", ["inspect", "{tmp}"],
         "inspect {tmp}: no prepare.json; not a folder written by `bertpre prepare`"),
    Case("inspect figure over a folder", ["inspect", "{data}", "--plot", "{tmp}/d.png"],
         "--plot {tmp}/d.png is a folder; name an image file", {"d.png/x": "x"}, unchanged=("d.png/x",)),
    Case("negative context-gain slice", train_args("--model.context_gain_batches", "-1"),
         "model.context_gain_batches must be 0 or more, got -1", absent=("run/checkpoints",)),
    Case("unknown AdamW kernel", train_args("--model.optimizer_implementation", "fast"),
         "model.optimizer_implementation must be one of auto, fused, foreach, for-loop, got 'fast'",
         absent=("run/checkpoints",)),
    Case("fine-tuning with a single class",
         ["finetune", "--config", SST2_CONFIG, "--model.pretrained", "{ckpt}", "--data.train_file", "{tmp}/t.tsv",
          "--data.validation_file", "{tmp}/t.tsv", "--trainer.default_root_dir", "{tmp}/ft"],
         "{tmp}/t.tsv: column 'label' has a single class ['1']",
         {"t.tsv": "sentence\tlabel\na fine film\t1\nanother\t1\n"}, absent=("ft/checkpoints",)),
]


@pytest.fixture(scope="module")
def pretrained(sample_checkpoint) -> Path:
    return sample_checkpoint


def test_there_are_at_least_sixty_hostile_inputs():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    assert {c.argv[0] for c in CASES} >= {"prepare", "tokenizer", "combine", "inspect", "train", "export", "import",
                                          "finetune", "predict"}


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
    if "{tmp}/model.ckpt" in case.argv:
        shutil.copyfile(pretrained, tmp_path / "model.ckpt")
    if case.argv[0] == "combine":
        shutil.copytree(sample_prepared, tmp_path / "a")
        shutil.copytree(sample_prepared, tmp_path / ("a_copy" if "twice" in case.name else "b"))
        if "twice" not in case.name:  # a second shard of its own
            record = json.loads((tmp_path / "b" / "prepare.json").read_text())
            (tmp_path / "b" / "prepare.json").write_text(json.dumps({**record, "seconds": -1}))
    if case.name == "export of another architecture's checkpoint":
        torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}, "epoch": 1}, tmp_path / "other.ckpt")
    before = {name: (tmp_path / name).read_bytes() for name in case.unchanged}
    train_pairs = PreparedData(sample_prepared).record.splits["train"].instances
    fill = {"tmp": str(tmp_path), "data": str(sample_prepared), "ckpt": str(pretrained), "train_pairs": train_pairs}
    argv = [a.format(**fill) for a in case.argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    expected = f"bertpre {argv[0]}: error: " + case.message.format(**fill, detail="\0")
    assert re.fullmatch("(.*)".join(map(re.escape, expected.split("\0"))), err.splitlines()[-1]), err
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


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and the last stderr line of ``bertpre ARGV``."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, (captured.err.strip().splitlines() or [""])[-1]


def test_two_prepares_into_one_output_at_once_are_refused(tmp_path, capsys):
    from bertpre.outputs import output_lock

    (tmp_path / "corpus.txt").write_text(TEXT)
    with output_lock(tmp_path / "out"):  # another command is writing out/
        code, _, err = run_main([a.format(tmp=tmp_path) for a in prepare_args()], capsys)
    assert code == 2
    assert err == f"bertpre prepare: error: --output {tmp_path}/out: another bertpre command is writing it; wait for " \
                  "it to finish"
    assert not (tmp_path / "out").exists()


def test_a_data_file_with_token_ids_outside_the_vocabulary_is_refused(sample_prepared, tmp_path, capsys):
    import pyarrow as pa

    damaged = tmp_path / "damaged"
    shutil.copytree(sample_prepared, damaged)
    path = damaged / "dataset" / "train-00000.arrow"
    table = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all()  # in memory: the file is rewritten
    ids = table.column("input_ids").combine_chunks()
    values = ids.values.to_numpy().copy()
    values[5] = 2000  # the vocabulary has 2000 entries: ids 0-1999
    table = table.set_column(0, "input_ids", pa.ListArray.from_arrays(ids.offsets, pa.array(values)))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    argv = [a.format(tmp=tmp_path, data=damaged) for a in train_args()]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert err == (f"bertpre train: error: data.path {damaged}: train-00000.arrow holds token id 2000, outside the "
                   "tokenizer's vocabulary of 2000; the file is damaged or from another tokenizer (run `bertpre "
                   "prepare` again)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def flip_a_weight_byte(checkpoint: Path, target: Path) -> None:
    """A copy of ``checkpoint`` with one byte inside its largest tensor changed, as a bad disk
    or copy would: the archive stays well-formed, only the member's checksum fails."""
    import zipfile

    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)
    name_and_extra = int.from_bytes(data[member.header_offset + 26: member.header_offset + 28], "little") + \
        int.from_bytes(data[member.header_offset + 28: member.header_offset + 30], "little")
    start = member.header_offset + 30 + name_and_extra
    data[start + member.file_size // 2] ^= 0x40
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["export", "init_from", "finetune"])
def test_a_checkpoint_that_fails_its_checksum_is_refused_by_every_reader(command, sample_prepared, pretrained,
                                                                          tmp_path, capsys):
    damaged = tmp_path / "damaged.ckpt"
    flip_a_weight_byte(pretrained, damaged)
    (tmp_path / "t.tsv").write_text(LABELLED)
    argv = {
        "export": ["export", str(damaged), "--output", str(tmp_path / "hf")],
        "init_from": [a.format(tmp=tmp_path, data=sample_prepared) for a in train_args()] +
                     ["--model.init_from", str(damaged)],
        "finetune": [a.format(tmp=tmp_path, ckpt=damaged) for a in finetune_args("--data.validation_file",
                                                                                 "{tmp}/t.tsv")],
    }[command]
    code, out, err = run_main(argv, capsys)
    assert code == 2 and "trained" not in out
    assert err.endswith(f"checkpoint {damaged}: corrupt: member {damaged.stem}/data/0 fails its checksum; it was "
                        "damaged after it was written") or "fails its checksum; it was damaged" in err, err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_in_which_no_step_succeeds_exits_non_zero(sample_prepared, pretrained, tmp_path, capsys):
    state = torch.load(pretrained, map_location="cpu", weights_only=True)
    name = next(k for k in state["state_dict"] if k.endswith("word.weight"))
    state["state_dict"][name][0, 0] = float("nan")
    poisoned = tmp_path / "nan.ckpt"
    torch.save(state, poisoned)
    argv = [a.format(tmp=tmp_path, data=sample_prepared) for a in train_args()] + ["--model.init_from", str(poisoned)]
    code, out, err = run_main(argv, capsys)
    assert code == 2, err
    assert "trained" not in out
    assert "non-finite" in err or "not finite" in err


def test_a_symlink_loop_and_a_file_named_twice_are_read_once(tmp_path):
    from bertpre.data.corpus import expand_inputs

    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(TEXT)
    (books / "self").symlink_to(".")
    (books / "again.txt").symlink_to(books / "a.txt")
    files = expand_inputs([str(books), str(books / "a.txt")])
    assert [f.resolve() for f in files] == [(books / "a.txt").resolve()]


def test_skip_unreadable_skips_a_corrupt_parquet_file(sample_prepared, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text(TEXT * 20)
    pq.write_table(pa.table({"text": [TEXT] * 50}), tmp_path / "in" / "bad.parquet")
    data = (tmp_path / "in" / "bad.parquet").read_bytes()
    (tmp_path / "in" / "bad.parquet").write_bytes(data[:8] + b"\0" * (len(data) - 16) + data[-8:])
    argv = ["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--tokenizer",
            str(sample_prepared), "--validation-fraction", "0"]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.endswith("(--skip-unreadable skips such files)") and "bad.parquet" in err
    code, out, _ = run_main(argv + ["--skip-unreadable"], capsys)
    assert code == 0 and "  warning: 1 unreadable files were skipped (listed in prepare.json)" in out.splitlines()
    skipped = PreparedData(tmp_path / "out").record.corpus.skipped_files
    assert len(skipped) == 1 and "bad.parquet" in skipped[0]
