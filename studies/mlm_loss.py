"""Is the MLM loss's own backward faster than F.cross_entropy's? Times bertpre's full training
step (forward, loss, backward, clipping, AdamW, as ``bertpre bench`` runs it) with the loss as it
is (bertpre.training.loss.masked_lm_cross_entropy: softmax minus one-hot written once) against the
same step whose MLM loss is ``F.cross_entropy(logits.float(), targets, ignore_index=-100)``,
alternating step by step in one process; prints the median ms/step of each and the ratio.

    python -m studies.mlm_loss --output DIR

Two shapes: configs/bert-mini-cpu.yaml's model (no dropout) at its batch 64 x 64 and vocabulary
8,192, and ``bertpre bench``'s default batch 32 x 128 at BERT's vocabulary 30,522 (dropout 0.1).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import bertpre.training.loss as loss_module
from bertpre.model.bert import BertConfig
from bertpre.perf.bench import BenchOptions, _build
from studies.step_arms import add_timing_arguments, time_alternating, write_results

SHAPES = {  # name: (batch, seq, vocab, dropout)
    "bert-mini-cpu": (64, 64, 8192, 0.0),
    "bench-default": (32, 128, 30522, 0.1),
}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The baseline: PyTorch's cross-entropy, with its own backward."""
    return F.cross_entropy(logits.float(), targets, ignore_index=loss_module.IGNORE_INDEX)


def with_mlm_loss(loss, step):
    """``step`` run with ``loss`` as the MLM loss that bertpre's pretraining loss calls."""
    def run() -> None:
        saved = loss_module.masked_lm_cross_entropy
        loss_module.masked_lm_cross_entropy = loss
        try:
            step()
        finally:
            loss_module.masked_lm_cross_entropy = saved
    return run


def time_shape(name: str, steps: int, warmup: int, precision: str, device: str) -> dict:
    batch, seq, vocab, dropout = SHAPES[name]
    options = BenchOptions(preset="bert-mini", batch_size=batch, seq_length=seq, vocab_size=vocab,
                           precision=precision, device=device)
    config = BertConfig.from_preset("bert-mini", vocab_size=vocab, hidden_dropout=dropout, attention_dropout=dropout)
    target = options.resolved_device()
    arms = {"own backward": with_mlm_loss(loss_module.masked_lm_cross_entropy,
                                          _build("bertpre", options, target, config=config)[1]),
            "F.cross_entropy": with_mlm_loss(cross_entropy, _build("bertpre", options, target, config=config)[1])}
    medians = time_alternating(arms, target, warmup, steps)
    return {"shape": name, "batch": batch, "seq": seq, "vocab": vocab, "dropout": dropout,
            "ms_per_step": {k: round(v, 2) for k, v in medians.items()},
            "cross_entropy_over_own": round(medians["F.cross_entropy"] / medians["own backward"], 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    add_timing_arguments(p)
    a = p.parse_args(argv)
    rows = []
    for name in a.shapes:
        row = time_shape(name, a.steps, a.warmup, a.precision, a.device)
        rows.append(row)
        ms = row["ms_per_step"]
        print(f"{name}: own backward {ms['own backward']} ms/step, F.cross_entropy {ms['F.cross_entropy']} ms/step, "
              f"F.cross_entropy / own {row['cross_entropy_over_own']}", flush=True)
    write_results(a, rows)


if __name__ == "__main__":
    main()
