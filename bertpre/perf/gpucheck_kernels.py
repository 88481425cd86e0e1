"""The gpu-check stages that time the step's parts in this process, outside ``bertpre train``: the
attention kernels and the q/k/v products, and the largest batch of a bigger model (the step under
the profiler: bertpre.perf.breakdown). Each takes the device and plain sizes and returns the
stage's result."""

from __future__ import annotations

import torch
from torch import Tensor

from bertpre.model.bert import BertConfig
from bertpre.perf.bench import BenchOptions, _build
from bertpre.perf.gpucheck_results import time_ms
from bertpre.training.throughput import model_flops_per_token, peak_flops


def math_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout: float) -> Tensor:
    """Attention written out, the candidate against SDPA's kernels at short lengths: q, k, v (B, N, T, D),
    ``key_mask`` (B, 1, 1, T) True where a key may be read; softmax in float32."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, N, T, T)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = torch.nn.functional.dropout(scores.float().softmax(-1), p=dropout, training=dropout > 0)
    return probs.to(v.dtype) @ v  # (B, N, T, D)


def attention_timings(device: torch.device, batch: int, heads: int, seq: int, size: int) -> dict:
    """SDPA forward + backward at (batch, heads, seq, size): no mask (Flash where it runs) and a
    padding mask (the kernel a padded batch gets), each with torch's choice and, on CUDA, each
    kernel forced, and ``math_attention`` compiled (inductor writes such a pattern back into SDPA
    without dropout, but keeps it with BERT's attention dropout); then the q/k/v projections as the
    model computes them (one product of the three weights side by side) against three separate products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, heads, seq, size, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device=device)
    mask[: batch // 2, ..., -seq // 8:] = False  # half the rows padded by an eighth
    cases = {"no mask (default choice)": (None, None), "padding mask (default choice)": (mask, None)}
    if device.type == "cuda":
        cases.update({"no mask, Flash": (None, SDPBackend.FLASH_ATTENTION),
                      "no mask, memory-efficient": (None, SDPBackend.EFFICIENT_ATTENTION),
                      "padding mask, memory-efficient": (mask, SDPBackend.EFFICIENT_ATTENTION)})
    timings = {}
    for name, (m, backend) in cases.items():
        def step(m=m):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.1)
            out.sum().backward()
        try:
            if backend is None:
                timings[name] = time_ms(step, device)
            else:
                with sdpa_kernel([backend]):
                    timings[name] = time_ms(step, device)
        except RuntimeError as e:
            timings[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
    compiled = torch.compile(math_attention, dynamic=False)
    for name, m in (("no mask, math compiled", None), ("padding mask, math compiled", mask)):
        def step(m=m):
            compiled(q, k, v, m, 0.1).sum().backward()
        try:
            timings[name] = time_ms(step, device)
        except Exception as e:  # a compiler failure is this candidate's result, not the stage's
            timings[name] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    hidden = heads * size
    x = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)
    weights = [torch.randn(hidden, hidden, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]

    def separate():
        sum(torch.nn.functional.linear(x, w).sum() for w in weights).backward()

    def fused():
        torch.nn.functional.linear(x, torch.cat(weights)).sum().backward()

    projections = {"q/k/v separate": time_ms(separate, device), "q/k/v fused": time_ms(fused, device)}
    return {"ok": True, "shape": [batch, heads, seq, size], "dtype": str(dtype), "ms": timings,
            "projections_ms": projections}


def largest_batch(device: torch.device, config: BertConfig, preset: str, batch_sizes: tuple[int, ...],
                  seq_length: int, repeats: int) -> dict:
    """bench's bertpre step for ``config`` in bf16 at growing batch sizes until memory runs out:
    time, tokens/s, MFU and peak memory of each size that fits."""
    rows, largest = [], None
    peak, _ = peak_flops(device, "bf16-mixed")
    for batch in batch_sizes:
        options = BenchOptions(preset=preset, batch_size=batch, seq_length=seq_length,
                               vocab_size=config.vocab_size, precision="bf16")
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            step = _build("bertpre", options, device, config=config)[1]  # the step holds the model
            seconds = time_ms(step, device, repeats=repeats)
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch_size": batch, "fits": False})
            break
        finally:
            step = None  # frees the model and its optimizer before the next size
        tokens = batch * seq_length / (seconds / 1000)
        row = {"batch_size": batch, "fits": True, "ms_per_step": round(seconds, 1), "tokens_per_sec": round(tokens)}
        if peak:
            row["mfu"] = round(tokens * model_flops_per_token(config, seq_length) / peak, 4)
        if device.type == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        rows.append(row)
        largest = batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ok": largest is not None, "preset": preset, "largest_batch": largest, "rows": rows}
