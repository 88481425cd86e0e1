"""Data-parallel training: ranks see disjoint data, uneven data does not hang, and two CPU
processes (DDP over gloo) train exactly like one process with the same global batch."""

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import ROOT, SAMPLE

from bertpre.data import PretrainDataModule
from bertpre.export import export_checkpoint
from bertpre.module import read_checkpoint
from bertpre.prepared import PreparedData

TINY = str(ROOT / "configs" / "bert-tiny.yaml")


def loader_indices(data_path: Path, world: int, rank: int, batch_size: int, epoch: int = 0) -> list[list[int]]:
    data = PretrainDataModule(str(data_path), batch_size=batch_size)
    data.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [list(batch) for batch in loader.batch_sampler]


def test_ranks_see_disjoint_data_and_the_same_global_batches(sample_prepared):
    single = loader_indices(sample_prepared, world=1, rank=0, batch_size=8)
    ranks = [loader_indices(sample_prepared, world=2, rank=r, batch_size=4) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]), "equal batch counts per rank: no rank waits forever"
    seen = [set(i for batch in r for i in batch) for r in ranks]
    assert not seen[0] & seen[1]
    assert all(len(s) == sum(map(len, r)) for s, r in zip(seen, ranks)), "no row twice on a rank"
    rows = len(PreparedData(sample_prepared).load_dataset()["train"])
    unseen = set(range(rows)) - seen[0] - seen[1]
    assert len(unseen) < 2 * 4, "only the tail that fills no global batch is left out"
    later = [loader_indices(sample_prepared, world=2, rank=r, batch_size=4, epoch=1) for r in (0, 1)]
    assert unseen != set(range(rows)) - {i % rows for r in later for batch in r for i in batch}, "another tail each epoch"
    for step, (a, b) in enumerate(zip(*ranks)):
        assert sorted(a + b) == sorted(single[step]), "global batch of 2 ranks x 4 == one process x 8"
    assert loader_indices(sample_prepared, 1, 0, 8, epoch=1) != single, "reshuffled each epoch"


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

