"""Throughput and model FLOPs utilisation (MFU), for ``bertpre bench`` and during training."""

from __future__ import annotations

import os
import time

import lightning as L
import torch

from bertpre.model.bert import BertConfig

# Dense peak FLOP/s of GPUs by name fragment, the most specific first: (bf16/fp16 tensor core,
# TF32 tensor core, fp32 without TF32), from the datasheets (their TF32 figures with sparsity
# halved). torch.cuda.get_device_name gives e.g. "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA
# H100 80GB HBM3" (the SXM part). An unknown part has no MFU unless BERTPRE_PEAK_TFLOPS (or
# `bertpre bench --peak-tflops`) gives its peak.
GPU_PEAK_FLOPS = {
    "H100 PCIe": (756e12, 378e12, 51e12),
    "H100 NVL": (835e12, 417.5e12, 60e12),
    "H200 NVL": (835e12, 417.5e12, 60e12),
    "H100": (989e12, 494.7e12, 67e12),
    "H200": (989e12, 494.7e12, 67e12),
    "GH200": (989e12, 494.7e12, 67e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "A10G": (125e12, 62.5e12, 31.2e12),
}
PEAK_ENV = "BERTPRE_PEAK_TFLOPS"


def model_flops_per_token(config: BertConfig, seq_length: int, predicted_fraction: float = 0.15,
                          attention: bool = True) -> float:
    """Training FLOPs per token: 6 x non-embedding encoder parameters, attention scores and
    values (12 x layers x seq x hidden; left out with ``attention=False``: what the matrix
    products of the weights compute), and the MLM head for the predicted share of tokens."""
    assert config.vocab_size is not None
    H, L_, I, V = config.hidden_size, config.num_layers, config.intermediate_size, config.vocab_size
    encoder = 6 * L_ * (4 * H * H + 2 * H * I)
    scores_and_values = 12 * L_ * seq_length * H if attention else 0
    mlm_head = 6 * predicted_fraction * (H * H + H * V)
    return float(encoder + scores_and_values + mlm_head)


def time_matmul(size: int, dtype: torch.dtype) -> float:
    """Seconds one ``size`` x ``size`` matrix product takes in ``dtype``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def measured_cpu_peak(dtype: torch.dtype = torch.float32, max_size: int = 2048, repeats: int = 8,
                      min_seconds: float = 0.05, budget_seconds: float = 1.0) -> tuple[float, int]:
    """(matmul FLOP/s of this CPU in ``dtype`` with torch's threads, the matrix size timed): the
    practical peak on CPU, as the best of ``repeats`` timings (best-of, because a shared machine
    has slow moments). The size doubles from 256 until one product takes ``min_seconds`` or
    ``max_size`` is reached, and the repeats stop once ``budget_seconds`` are spent, so a dtype the
    CPU only emulates (bf16 without AVX512-BF16 or AMX, about 50 s a 2048 product here) costs
    about a second instead of minutes."""
    size = 256
    took = time_matmul(size, dtype)
    while took < min_seconds and size < max_size:
        size *= 2
        took = time_matmul(size, dtype)
    best, spent = took, 0.0
    for _ in range(repeats):
        if spent >= budget_seconds:
            break
        took = time_matmul(size, dtype)
        best, spent = min(best, took), spent + took
    return 2 * size**3 / best, size


def gpu_peak(name: str, precision: str, matmul_precision: str | None = None) -> tuple[float | None, str]:
    """The datasheet peak of the GPU called ``name`` (as torch names it) at ``precision``. An fp32
    run's matrix products run at torch's float32 matmul precision (``matmul_precision``, default
    the current one): "highest" in fp32, "high" in TF32 (what bertpre sets on CUDA), "medium" in bf16."""
    if "16" in str(precision):
        kind = 0
    else:
        kind = {"highest": 2, "high": 1, "medium": 0}[matmul_precision or torch.get_float32_matmul_precision()]
    for fragment, peaks in GPU_PEAK_FLOPS.items():
        if fragment in name:
            return peaks[kind], f"{fragment} dense {('bf16', 'TF32', 'fp32')[kind]} datasheet peak"
    return None, f"unknown peak for {name} (set {PEAK_ENV} or --peak-tflops)"


_CPU_PEAKS: dict[tuple[torch.dtype, int], tuple[float, int]] = {}  # (dtype, torch threads) -> measured_cpu_peak


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """Peak FLOP/s to measure MFU against, and where the figure comes from: ``override_tflops``
    or the BERTPRE_PEAK_TFLOPS environment variable if given, else the datasheet (GPU) or a
    measured matmul peak in the run's precision (CPU; timed once per process)."""
    override = override_tflops if override_tflops is not None else os.environ.get(PEAK_ENV)
    if override not in (None, ""):
        return float(override) * 1e12, f"{float(override):g} TFLOP/s given"
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    if device.type == "cpu":
        dtype = torch.bfloat16 if "bf16" in str(precision) else torch.float32
        key = (dtype, torch.get_num_threads())
        if key not in _CPU_PEAKS:  # once per process: runs in one process (a study's arms) share one denominator
            _CPU_PEAKS[key] = measured_cpu_peak(dtype=dtype)
        peak, size = _CPU_PEAKS[key]
        return peak, f"best timed {dtype} {size}x{size} matmul on this CPU"
    return None, f"unknown peak for {device.type}"


class ThroughputLogger(L.Callback):
    """Logs perf/tokens_per_sec (real tokens, padding excluded), perf/samples_per_sec,
    perf/padding_share, perf/mfu (model FLOPs of the real tokens over the peak), all ranks
    together, and on CUDA perf/peak_memory_gb (this rank's allocator peak), over windows of
    ``window`` training batches.

    A window is timed between two device syncs (the one at its end also reads the real-token
    count, summed on the device: one host sync per window, none per step). The first window of a
    run (or of a resumed run) is not logged: it holds start-up, warm-up and compilation. A window
    in which validation ran or a checkpoint was written is dropped, not averaged in: the figures
    are the training step's own. The peak is found when the first window is logged (a CPU's is
    timed then, between two windows), so a run too short to log one never pays for it."""

    def __init__(self, window: int = 10, skip_first: bool = True) -> None:
        self.window = window
        self.skip_first = skip_first
        self.peak: float | None = None
        self.peak_pending = False  # set at the start of a run: find the peak before the first window is logged
        self.windows = 0  # windows timed so far (the first is skipped)
        self._reset(None)

    def _reset(self, start: float | None) -> None:
        self.start, self.batches, self.slots, self.samples, self.flops_per_token = start, 0, 0, 0, 0.0
        self.tokens: torch.Tensor | int = 0  # real tokens, on the batch's device

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the time of the work done, not of the work queued
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_pending = True
        self.windows = 0
        self._reset(None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = self._now(pl_module.device)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._reset(None)  # the window would hold validation: dropped, the next one starts after it

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._reset(None)  # the next step's window would hold the write

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is None:
            return
        B, T = batch["input_ids"].shape
        self.batches += 1
        self.slots += B * T
        self.tokens = self.tokens + batch["attention_mask"].sum()
        self.samples += B
        slots = batch["mlm_positions"].shape[1] / T if "mlm_positions" in batch else 0.15  # MLM head's share
        self.flops_per_token = model_flops_per_token(pl_module.config, T, slots)
        if self.batches < self.window:
            return
        device = pl_module.device
        elapsed = self._now(device) - self.start
        self.windows += 1
        if self.skip_first and self.windows == 1:
            self._reset(time.perf_counter())
            return
        world = trainer.world_size
        tokens = int(self.tokens)  # already computed: the sync above waited for it
        if self.peak_pending:  # after this window's time was taken; the next window starts after it
            self.peak, self.peak_pending = peak_flops(device, str(trainer.precision))[0], False

        def log(name: str, value: float, **kwargs) -> None:  # host tensors: Lightning copies Python numbers
            pl_module.log(name, torch.tensor(value, dtype=torch.float32), batch_size=B, **kwargs)

        log("perf/tokens_per_sec", world * tokens / elapsed, prog_bar=True)
        log("perf/samples_per_sec", world * self.samples / elapsed)
        log("perf/padding_share", 1 - tokens / max(self.slots, 1))
        if self.peak:
            log("perf/mfu", tokens * self.flops_per_token / elapsed / self.peak, prog_bar=True)
        if device.type == "cuda":
            log("perf/peak_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30)
        self._reset(time.perf_counter())
