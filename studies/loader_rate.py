"""How fast one data-loader process makes masked training batches: can the input pipeline feed a GPU?

    python -m studies.loader_rate --data PREPARED_DIR [--batch-size 256] [--batches 30] --output DIR

For each masking setting (BERT's 15%, the 30% of configs/bert-base.yaml, whole-word masking at
15%), the training loader of `PretrainDataModule` runs in this process
(num_workers 0: the work one worker does), padded to the full length as a compiled run pads; the
first batch is not timed. Writes DIR/results.json: sequences and tokens per second of one process.
A run with data.num_workers N has N such processes; a GPU needs as many as its tokens/s divided by
one process's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bertpre.data.datamodule import PretrainDataModule
from bertpre.data.prepared import PreparedData
from bertpre.perf.bench import machine_description


def rate(data: Path, batch_size: int, batches: int, **masking) -> dict:
    module = PretrainDataModule(str(data), batch_size=batch_size, num_workers=0, **masking)
    module.setup("fit")
    batch_iterator = iter(module.train_dataloader())
    first = next(batch_iterator)
    width = first["input_ids"].shape[1]
    start = time.perf_counter()
    sequences = 0
    for _ in range(batches):
        sequences += next(batch_iterator)["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    return {**masking, "sequences_per_sec": round(sequences / seconds), "tokens_per_sec": round(sequences * width / seconds),
            "width": width}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="a folder written by bertpre prepare")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args()
    length = PreparedData(args.data).record.options["pairs"]["max_seq_length"]
    settings = [dict(mlm_probability=0.15), dict(mlm_probability=0.3), dict(mlm_probability=0.15, whole_word_masking=True)]
    rows = [rate(args.data, args.batch_size, args.batches, pad_to_multiple_of=length, **s) for s in settings]
    results = {"data": str(args.data), "batch_size": args.batch_size, "batches": args.batches,
               "machine": machine_description(torch.device("cpu")), "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
