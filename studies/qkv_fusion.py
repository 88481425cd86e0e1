"""Does one q/k/v product (the model's attention) beat three? Times bertpre's full training step
(forward, loss, backward, clipping, AdamW, as ``bertpre bench`` runs it) with the model as it is
against the same model whose layers project q, k and v with three separate products, alternating
step by step in one process, and prints the median ms/step of each and the ratio.

    python -m studies.qkv_fusion --presets bert-mini bert-small --precision bf16 --output DIR
"""

from __future__ import annotations

import argparse
import types

import torch

from bertpre.model.bert import PRESETS, EncoderLayer
from bertpre.perf.bench import BenchOptions, _build
from studies.step_arms import add_timing_arguments, time_alternating, write_results


def separate_projections(self: EncoderLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The baseline: q, k and v from three products."""
    return self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))  # each (B, N, T, D)


def with_separate_projections(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.modules():
        if isinstance(layer, EncoderLayer):
            layer._qkv = types.MethodType(separate_projections, layer)
    return model


def time_arms(options: BenchOptions) -> dict:
    device = options.resolved_device()
    fused_model, fused = _build("bertpre", options, device)
    separate_model, separate = _build("bertpre", options, device)
    with_separate_projections(separate_model)
    # the same seed, weights and batch: only the q/k/v projections differ
    medians = time_alternating({"fused": fused, "separate": separate}, device, options.warmup, options.steps)
    return {"preset": options.preset, "ms_per_step": {k: round(v, 2) for k, v in medians.items()},
            "separate_over_fused": round(medians["separate"] / medians["fused"], 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["bert-mini", "bert-small"], choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=30522)
    add_timing_arguments(p)
    a = p.parse_args(argv)
    rows = []
    for preset in a.presets:
        options = BenchOptions(preset=preset, batch_size=a.batch_size, seq_length=a.seq_length,
                               vocab_size=a.vocab_size, steps=a.steps, warmup=a.warmup,
                               precision=a.precision, device=a.device)
        row = time_arms(options)
        rows.append(row)
        print(f"{preset}: fused {row['ms_per_step']['fused']} ms/step, separate {row['ms_per_step']['separate']} "
              f"ms/step, separate / fused {row['separate_over_fused']}", flush=True)
    write_results(a, rows)


if __name__ == "__main__":
    main()
