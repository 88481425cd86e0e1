"""`bertpre train` across processes: two CPU processes (DDP over gloo) train exactly like one
process with the same global batch. (The rank-disjoint sampling is in test_data.py.)"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import ROOT, SAMPLE

from bertpre.data.prepared import PreparedData
from bertpre.model.checkpoint import read_checkpoint
from bertpre.model.export import export_checkpoint

TINY = str(ROOT / "configs" / "bert-tiny.yaml")


def make_uniform_dataset(source: Path, out: Path, rows: int) -> None:
    """A prepared folder whose pairs all have the same length and number of masked tokens, so that
    per-rank mean losses average to the global mean exactly."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("dataset"))
    table = PreparedData(source).load_dataset()["train"].data.table
    lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    masked = pc.list_value_length(table["masked_lm_positions"]).to_numpy()
    full = table.take(np.flatnonzero((lengths == 64) & (masked == 10)))
    assert len(full) >= rows
    (out / "dataset").mkdir()
    for name, part in (("train", full.slice(0, rows)), ("validation", full.slice(rows, 8))):
        with pa.ipc.new_stream(str(out / "dataset" / f"{name}-00000.arrow"), part.schema) as writer:
            writer.write_table(part)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(sample_prepared, tmp_path):
    static = tmp_path / "static"
    subprocess.run([sys.executable, "-m", "bertpre.cli", "prepare", "--input", str(SAMPLE / "austen-persuasion.txt"),
                    "--output", str(static), "--tokenizer", str(sample_prepared), "--max-seq-length", "64",
                    "--static-masking", "--validation-fraction", "0"], check=True, capture_output=True)
    uniform = tmp_path / "uniform"
    make_uniform_dataset(static, uniform, rows=37)  # 37 rows: ranks get an uneven split before padding
    common = ["--config", TINY, "--data.path", str(uniform), "--model.config.hidden_dropout", "0",
              "--model.config.attention_dropout", "0", "--trainer.max_steps", "10", "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
              "--trainer.logger", "false", "--trainer.enable_model_summary", "false"]
    runs = {"single": ["--data.batch_size", "8", "--trainer.devices", "1"],
            "ddp": ["--data.batch_size", "4", "--trainer.devices", "2", "--trainer.strategy", "ddp"]}
    for name, extra in runs.items():
        done = subprocess.run([sys.executable, "-m", "bertpre.cli", "train", *common, *extra,
                               "--trainer.default_root_dir", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "trained 10 steps" in done.stdout  # 4 steps an epoch: 10 steps cross two epoch ends
        if name == "ddp":
            assert "MEMBER: 2/2" in done.stderr and "gloo" in done.stderr, done.stderr[-2000:]
    single = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")
    ddp = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert single["global_step"] == ddp["global_step"] == 10
    adam_state = single["optimizer_states"][0]["state"]
    assert adam_state and all(s["exp_avg"].abs().max() > 0 for s in adam_state.values()), "10 real updates"
    names = single["state_dict"].keys()
    assert names == ddp["state_dict"].keys()
    worst = max((single["state_dict"][k] - ddp["state_dict"][k]).abs().max().item() for k in names)
    assert worst < 1e-5, f"DDP weights differ from single-process weights by {worst}"
    print(f"largest weight difference, DDP vs one process: {worst:.2e}")
    transformers = pytest.importorskip("transformers")
    exported = export_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt", tmp_path / "ddp-hf")
    assert transformers.BertForPreTraining.from_pretrained(str(exported)).config.num_hidden_layers == 2

