"""``bertpre bench``: bertpre's training step against transformers' BertForPreTraining.

Both models get the same config, the same weights (through the HF name map), the same
batches (15% of positions predicted, NSP labels) and the same optimizer (AdamW with
BERT's weight-decay groups). bertpre's step is its training step: the MLM head at the fixed
prediction slots its collator gives (20 per 128 tokens, empty ones ignored by the loss). Steps alternate between the two after warm-up, so that
both see the same machine state; the median step time is reported. Peak memory is the
CUDA allocator's peak on GPU, and on CPU the peak RSS of a separate process that runs
only that model's steps.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bertpre.data.masking import default_max_predictions, prediction_slots
from bertpre.errors import UserError
from bertpre.model.bert import BertConfig, BertForPretraining
from bertpre.model.hf import to_transformers
from bertpre.training.loss import pretraining_loss
from bertpre.training.optim import adamw_implementation, parameter_groups
from bertpre.training.precision import emulated_bf16_warning, resolve_device, use_tensor_cores
from bertpre.training.throughput import model_flops_per_token, peak_flops

FRAMEWORKS = ("bertpre", "transformers")


@dataclass
class BenchOptions:
    preset: str = "bert-mini"
    batch_size: int = 32
    seq_length: int = 128
    vocab_size: int = 30522
    steps: int = 5
    warmup: int = 2
    device: str = "auto"
    precision: str = "32"  # or bf16 (autocast)
    compile: bool = False
    peak_tflops: float | None = None  # the device's peak for MFU, where the datasheet table lacks it

    def resolved_device(self) -> torch.device:
        """The device to time on (a UserError names --device when it is no device or a GPU this machine lacks)."""
        return resolve_device(self.device)


def _batch(options: BenchOptions, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, T = options.batch_size, options.seq_length
    input_ids = torch.randint(5, options.vocab_size, (B, T), generator=g)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, T // 2 :] = 1
    predict = torch.rand(B, T, generator=g) < 0.15
    predict[:, 0] = False
    labels = torch.where(predict, input_ids, torch.full_like(input_ids, -100))
    batch = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "next_sentence_label": torch.randint(0, 2, (B,), generator=g),
    }
    # bertpre's training step reads Google-style prediction slots (fixed count per row), as its collator gives
    positions, slot_labels = prediction_slots(labels.numpy(), default_max_predictions(T))
    batch["mlm_positions"], batch["mlm_labels"] = torch.from_numpy(positions), torch.from_numpy(slot_labels)
    return {k: v.to(device) for k, v in batch.items()}


def _build(framework: str, options: BenchOptions, device: torch.device,
           config: BertConfig | None = None) -> tuple[torch.nn.Module, Callable[[], None]]:
    """The model (``options.preset``'s, or ``config``) and a function that runs one full training
    step on a fixed batch."""
    torch.manual_seed(0)
    config = config or BertConfig.from_preset(options.preset, vocab_size=options.vocab_size)
    ours = BertForPretraining(config)
    model = to_transformers(ours, pad_token_id=0, attn_implementation="sdpa") if framework == "transformers" else ours
    model.to(device).train()
    if options.compile:
        model.compile()
    kernel = adamw_implementation("auto", device.type)  # the kernel training's default picks, for both models
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, eps=1e-6, **kernel)
    batch = _batch(options, device)
    slots = {k: batch.pop(k) for k in ("mlm_positions", "mlm_labels")}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16")

    def step() -> None:
        with autocast:
            if framework == "transformers":
                loss = model(**batch).loss
            else:
                mlm, nsp = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                 positions=slots["mlm_positions"])
                loss = pretraining_loss(mlm, slots["mlm_labels"], nsp, batch["next_sentence_label"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb(framework: str, options: BenchOptions) -> float:
    """Peak RSS of a fresh process running warm-up plus two steps of one framework (CPU)."""
    code = "import json, sys; from bertpre.perf.bench import _rss_worker; print(_rss_worker(sys.argv[1], sys.argv[2]))"
    done = subprocess.run([sys.executable, "-c", code, framework, json.dumps(asdict(options))],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _rss_worker(framework: str, options_json: str) -> float:
    opts = BenchOptions(**json.loads(options_json))
    _, step = _build(framework, opts, torch.device("cpu"))
    for _ in range(opts.warmup + 2):
        step()
    # Not getrusage's ru_maxrss: on Linux it survives fork and exec, so a child would report
    # the parent's size. VmHWM is this process image's own high-water mark.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def run_bench(options: BenchOptions) -> dict:
    if options.steps < 1 or options.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    if options.precision not in ("32", "bf16"):
        raise UserError(f"--precision must be 32 or bf16, got {options.precision}")
    device = options.resolved_device()
    use_tensor_cores(device)  # fp32 matrix products in TF32 on CUDA, as training runs them
    warning = emulated_bf16_warning(device.type, options.precision, option="--precision")
    if warning:
        print(warning, flush=True)
    steps = {name: _build(name, options, device)[1] for name in FRAMEWORKS}
    for name in FRAMEWORKS:
        for _ in range(options.warmup):
            steps[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in FRAMEWORKS}
    peak_memory: dict[str, float] = {}
    for _ in range(options.steps):
        for name in FRAMEWORKS:  # alternate, so both see the same machine state
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak_memory[name] = max(peak_memory.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    del steps
    if device.type != "cuda":
        peak_memory = {name: _peak_rss_mb(name, options) for name in FRAMEWORKS}
    tokens = options.batch_size * options.seq_length
    config = BertConfig.from_preset(options.preset, vocab_size=options.vocab_size)
    flops = model_flops_per_token(config, options.seq_length)
    peak, peak_source = peak_flops(device, options.precision, options.peak_tflops)
    result = {"options": asdict(options), "machine": machine_description(device), "peak_flops": peak,
              "peak_flops_source": peak_source, "frameworks": {}}
    for name in FRAMEWORKS:
        step_s = statistics.median(times[name])
        result["frameworks"][name] = {
            "ms_per_step": round(1000 * step_s, 1),
            "tokens_per_s": round(tokens / step_s),
            "mfu": round(flops * tokens / step_s / peak, 4) if peak else None,
            "peak_memory_mb": round(peak_memory[name]),
        }
    ours, theirs = result["frameworks"]["bertpre"], result["frameworks"]["transformers"]
    result["speedup"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
    return result


def format_result(result: dict) -> str:
    o = result["options"]
    lines = [
        f"{o['preset']}, batch {o['batch_size']} x seq {o['seq_length']}, vocab {o['vocab_size']}, "
        f"precision {o['precision']}{', compiled' if o['compile'] else ''}, AdamW; median of {o['steps']} "
        f"alternating steps after {o['warmup']} warm-up",
        f"  machine: {result['machine']}",
        f"  {'':<13}{'ms/step':>9}{'tokens/s':>10}{'MFU':>8}{'peak MB':>9}",
    ]
    for name, r in result["frameworks"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"  {name:<13}{r['ms_per_step']:>9}{r['tokens_per_s']:>10}{mfu:>8}{r['peak_memory_mb']:>9}")
    lines.append(f"  speedup (bertpre / transformers tokens/s): {result['speedup']}x")
    if result["peak_flops"]:
        lines.append(f"  MFU against {result['peak_flops'] / 1e12:.3g} TFLOP/s ({result['peak_flops_source']})")
    return "\n".join(lines)
