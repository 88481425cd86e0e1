"""Throughput and model FLOPs utilisation (MFU), for ``bertpre bench`` and during training."""

from __future__ import annotations

import time

import lightning as L
import torch

from bertpre.model import BertConfig

# Dense peak FLOP/s of GPUs by name fragment: (bf16/fp16 tensor core, fp32 without TF32).
GPU_PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "A10G": (125e12, 31.2e12),
}


def model_flops_per_token(config: BertConfig, seq_length: int, predicted_fraction: float = 0.15) -> float:
    """Training FLOPs per token: 6 x non-embedding encoder parameters, attention scores and
    values (12 x layers x seq x hidden), and the MLM head for the predicted share of tokens."""
    assert config.vocab_size is not None
    H, L_, I, V = config.hidden_size, config.num_layers, config.intermediate_size, config.vocab_size
    encoder = 6 * L_ * (4 * H * H + 2 * H * I)
    attention = 12 * L_ * seq_length * H
    mlm_head = 6 * predicted_fraction * (H * H + H * V)
    return float(encoder + attention + mlm_head)


def measured_cpu_peak(size: int = 2048, repeats: int = 8) -> float:
    """fp32 matmul FLOP/s of this CPU with torch's threads, the best of ``repeats`` timings:
    the practical peak on CPU (best-of, because a shared machine has slow moments)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """Peak FLOP/s to measure MFU against, and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (half, single) in GPU_PEAK_FLOPS.items():
            if fragment in name:
                low = "16" in str(precision)
                return (half if low else single), f"{fragment} dense {'bf16' if low else 'fp32'} datasheet peak"
        return None, f"unknown peak for {name}"
    if device.type == "cpu":
        return measured_cpu_peak(), "best of 8 timed fp32 2048x2048 matmuls on this CPU"
    return None, f"unknown peak for {device.type}"


class ThroughputLogger(L.Callback):
    """Logs perf/tokens_per_sec, perf/samples_per_sec and perf/mfu (all ranks together),
    averaged over windows of ``window`` training batches. Tokens include padding: they are
    what the model computed on. No device synchronisation is added."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.peak: float | None = None
        self._reset(None)

    def _reset(self, start: float | None) -> None:
        self.start, self.batches, self.tokens, self.samples, self.flops = start, 0, 0, 0, 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak, _ = peak_flops(pl_module.device, str(trainer.precision))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        B, T = batch["input_ids"].shape
        self.batches += 1
        self.tokens += B * T
        self.samples += B
        self.flops += B * T * model_flops_per_token(pl_module.config, T)
        if self.batches < self.window:
            return
        elapsed = time.perf_counter() - self.start
        world = trainer.world_size
        pl_module.log("perf/tokens_per_sec", world * self.tokens / elapsed, prog_bar=True, batch_size=B)
        pl_module.log("perf/samples_per_sec", world * self.samples / elapsed, batch_size=B)
        if self.peak:
            pl_module.log("perf/mfu", self.flops / elapsed / self.peak, prog_bar=True, batch_size=B)
        self._reset(time.perf_counter())
