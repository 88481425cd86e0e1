"""Where a training step's time goes: a few steps under torch.profiler, the device's kernel time
(on a CPU, the operators' own time) grouped by what the kernel does.

On a GPU the shares are of the time kernels ran; ``busy`` says how much of the step's wall time
that was (the rest: the device waited for the host). With the step's matrix-product FLOPs, the
time in matrix-product kernels gives the rate they reach, to compare with the device's peak:
a step can be slow because its matrix products are, or because of everything around them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bertpre.data.masking import default_max_predictions
from bertpre.model.bert import BertConfig
from bertpre.perf.bench import BenchOptions, _build, _sync
from bertpre.training.throughput import model_flops_per_token

# (category, substrings of a lower-cased kernel or operator name), the first match wins: the
# loss's log-softmax before attention's softmax; attention before matmul (attention kernels are
# built from CUTLASS too); inductor's matrix-product templates (triton_tem_*) before its other
# kernels, which fuse whatever the graph held (a LayerNorm, a dropout, a residual add) and are
# named after it; the optimizer before the generic kernels its foreach and fused forms launch
CATEGORIES = (
    ("loss", ("log_softmax", "logsoftmax", "cross_entropy", "nll_loss")),
    # the fused kernels; without one (a CPU training step: dropout inside attention), SDPA's math
    # path: batched products of scores and values, and a softmax
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax", "aten::bmm")),
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "triton_tem", "aten::mm", "aten::addmm",
                "aten::matmul", "aten::_addmm")),
    ("compiled (fused)", ("triton", "cpp_fused", "compiledfxgraph")),  # on CPU: a compiled graph's call
    ("optimizer and clipping", ("adam", "multi_tensor", "foreach", "clip_grad")),  # LAMB: foreach kernels
    ("layer norm", ("layer_norm", "layernorm")),
    ("dropout", ("dropout", "philox", "bernoulli")),
    ("gelu", ("gelu",)),
    ("embedding and indexing", ("embedding", "index", "scatter", "gather", "radix", "sort", "segment")),
    ("copies", ("memcpy", "memset", "copy", "cat", "fill", "zero")),
)
OTHER = "elementwise and other"


def kernel_category(name: str) -> str:
    """What a GPU kernel or CPU operator does, from its name (``CATEGORIES``), or OTHER."""
    lowered = name.lower()
    for category, needles in CATEGORIES:
        if any(n in lowered for n in needles):
            return category
    return OTHER


def own_time(events, on_device: bool) -> dict[str, float]:
    """Microseconds each kernel (``on_device``: the CUDA rows of the profiler's averages; the CPU
    operators that launched them are left out, or their kernels would count twice) or each CPU
    operator (its own time, without the profiler's step markers) spent, by name."""
    own: dict[str, float] = {}
    for event in events:
        if on_device:
            if event.device_type != DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            if event.device_type != DeviceType.CPU or event.key.startswith("ProfilerStep"):
                continue
            micros = event.self_cpu_time_total
        if micros > 0:
            own[event.key] = own.get(event.key, 0.0) + micros
    return own


def summarise(own: dict[str, float], steps: int, wall: float, on_device: bool, matmul_flops: float | None = None,
              top: int = 12) -> dict:
    """``own`` (microseconds by kernel or operator over ``steps`` steps that took ``wall`` seconds)
    per step by category (ms and share), the ``top`` names, the device's busy share of the wall
    time (GPU), and given one step's matrix-product FLOPs, the rate those kernels reach."""
    total = sum(own.values())
    assert total > 0, "the profiler recorded no time"
    categories: dict[str, float] = {}
    for name, micros in own.items():
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + micros
    ms = {c: round(v / 1000 / steps, 3) for c, v in sorted(categories.items(), key=lambda kv: -kv[1])}
    result = {
        "steps": steps,
        "what": "CUDA kernels' time" if on_device else "CPU operators' own time",
        "wall_ms_per_step": round(1000 * wall / steps, 3),
        "profiled_ms_per_step": round(total / 1000 / steps, 3),
        "ms_per_step": ms,
        "share": {c: round(v / total, 4) for c, v in categories.items()},
        "top": [{"name": name[:160], "category": kernel_category(name), "ms_per_step": round(v / 1000 / steps, 3),
                 "share": round(v / total, 4)}
                for name, v in sorted(own.items(), key=lambda kv: -kv[1])[:top]],
    }
    if on_device:
        result["busy"] = round(min(1.0, total / 1e6 / wall), 4)
    matmul_s = categories.get("matmul", 0.0) / 1e6 / steps
    if matmul_flops and matmul_s > 0:
        result["matmul_flops"] = matmul_flops
        result["matmul_tflops"] = float(f"{matmul_flops / matmul_s / 1e12:.3g}")  # 3 significant digits
    return result


def profile_step(step: Callable[[], None], device: torch.device, steps: int = 5, warmup: int = 3,
                 matmul_flops: float | None = None, top: int = 12) -> dict:
    """Run ``step`` ``warmup`` times, then ``steps`` times under the profiler (with CUDA's
    activity on a GPU): ``summarise`` of what it recorded."""
    assert steps >= 1 and warmup >= 0
    for _ in range(warmup):
        step()
    _sync(device)
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - start
    return summarise(own_time(prof.key_averages(), on_device), steps, wall, on_device, matmul_flops, top)


def format_profile(result: dict) -> str:
    """The categories as a small table: ms per step and share."""
    lines = [f"{result['what']}: {result['profiled_ms_per_step']} ms a step of {result['wall_ms_per_step']} ms wall"
             + (f" (device busy {100 * result['busy']:.0f}%)" if "busy" in result else "")
             + (f"; matrix products at {result['matmul_tflops']} TFLOP/s" if "matmul_tflops" in result else "")]
    for category, ms in result["ms_per_step"].items():
        lines.append(f"  {category:<24}{ms:>10.3f} ms{100 * result['share'][category]:>7.1f}%")
    return "\n".join(lines)


def step_profile(device: torch.device, options: BenchOptions, steps: int = 5, framework: str = "bertpre") -> dict:
    """bench's step of ``framework`` (bertpre's, or transformers' BertForPreTraining) under the
    profiler: its time by kernel category, and the rate its matrix products reach (the products of
    the weights: the encoder's, and the MLM head's where it is evaluated: bertpre's at the
    prediction slots the collator gives, transformers' at every position)."""
    step = _build(framework, options, device)[1]
    config = BertConfig.from_preset(options.preset, vocab_size=options.vocab_size)
    T = options.seq_length
    head_share = default_max_predictions(T) / T if framework == "bertpre" else 1.0
    per_token = model_flops_per_token(config, T, head_share, attention=False)
    result = profile_step(step, device, steps=steps, matmul_flops=per_token * options.batch_size * T)
    return {"framework": framework, "preset": options.preset, "batch_size": options.batch_size,
            "compiled": options.compile, **result}
