"""What the machine supports, for the choices bertpre makes for the user: the training
precision when the config leaves ``trainer.precision`` unset (``null``), and why a GPU asked for
is not there."""

from __future__ import annotations

import os
from pathlib import Path

from bertpre.errors import UserError

# CPU flags (Linux /proc/cpuinfo) of native bf16 matrix arithmetic: without them bf16 runs emulated,
# several times slower than fp32 (measured: bert-mini did not finish 4 steps in 5 minutes on an AMD
# EPYC without them, against 2.5 s a step in fp32)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (default: /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16_flags(flags: set[str] | None = None) -> list[str]:
    """The flags in ``flags`` (default: this CPU's) by which the CPU computes bf16 natively."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in CPU_BF16_FLAGS if f in flags]


def auto_precision(on_cuda: bool, cuda_bf16: bool = False, flags: set[str] | None = None) -> tuple[str, str]:
    """(precision, why) for Lightning's Trainer: bf16-mixed where the hardware computes bf16
    natively, 16-mixed on a GPU without bf16, else fp32."""
    if on_cuda:
        if cuda_bf16:
            return "bf16-mixed", "the GPU computes bf16 natively"
        return "16-mixed", "the GPU has no bf16: fp16 with loss scaling"
    native = native_bf16_flags(flags)
    if native:
        return "bf16-mixed", f"the CPU has {'/'.join(native)}"
    return "32-true", "the CPU has no AVX512-BF16 or AMX: bf16 would be emulated and slower than fp32"


def cuda_bf16_native() -> bool:
    """Whether the current GPU computes bf16 natively (compute capability 8.0 on, or ROCm). An older
    one (V100, T4) only emulates it, which ``torch.cuda.is_bf16_supported()`` counts as support."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def emulated_bf16_warning(device_type: str, precision: str, flags: set[str] | None = None,
                          option: str = "trainer.precision") -> str | None:
    """The warning for a run asked (by ``option``) to compute in bf16 on a CPU or GPU that only
    emulates it, else None."""
    if "bf16" not in str(precision):
        return None
    if device_type == "cuda":
        if cuda_bf16_native():
            return None
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return (f"warning: {option} {precision} on {props.name} (compute capability {props.major}.{props.minor}), "
                "which has no native bf16 (8.0 on): bf16 is emulated there, many times slower; 16-mixed (fp16 with "
                "loss scaling) is this GPU's mixed precision")
    if device_type != "cpu" or native_bf16_flags(flags):
        return None
    return (f"warning: {option} {precision} on a CPU without AVX512-BF16 or AMX: bf16 is emulated there, "
            "many times slower than fp32 (fp32 is the faster choice on this machine)")


def resolve_precision(accelerator: str | None) -> tuple[str, str]:
    """``auto_precision`` for the accelerator a run asks for ('auto', 'cpu', 'gpu', 'cuda', ...)."""
    import torch

    wants_gpu = str(accelerator or "auto") in ("auto", "gpu", "cuda")
    on_cuda = wants_gpu and torch.cuda.is_available()
    return auto_precision(on_cuda, cuda_bf16=on_cuda and cuda_bf16_native())


def missing_cuda(device: str = "cuda") -> str | None:
    """Why ``device`` ('cuda' or 'cuda:N') cannot run here, in words that say what to check, or
    None when it can."""
    import torch

    index = torch.device(device).index or 0
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index < count:
        return None
    if count:
        return f"torch sees {count} GPU{'s' if count > 1 else ''} ({', '.join(f'cuda:{i}' for i in range(count))})"
    toolkit = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}" if torch.version.hip else None
    if toolkit is None:
        return f"torch {torch.__version__} is a CPU-only build (install a build of torch for your GPU)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return f"torch {torch.__version__} ({toolkit}) finds no GPU (is one visible, with a driver for {toolkit}?)"


def resolve_device(name: str, option: str = "--device"):
    """``name`` (auto, cpu, cuda or cuda:N) as a torch.device, auto being the first GPU where torch
    sees one; a name that is no such device, or a GPU this machine lacks, is a UserError naming ``option``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"{option} {name}: not a device this command runs on (auto, cpu, cuda or cuda:N)")
    why = missing_cuda(name) if device.type == "cuda" else None
    if why:
        raise UserError(f"{option} {name}: {why}")
    return device


def use_tensor_cores(device) -> None:
    """On a CUDA ``device``, fp32 matrix products run on tensor cores (TF32: fp32's range, a 10-bit
    mantissa, several times the fp32 rate); mixed-precision runs are unaffected."""
    import torch

    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
