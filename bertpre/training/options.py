"""The pretraining module's options, checked before anything is built: each error names its option."""

from __future__ import annotations

from typing import Any

from bertpre.errors import UserError
from bertpre.training.optim import OPTIMIZERS, SCHEDULES, adamw_implementation

# torch.compile's modes; "reduce-overhead" and "max-autotune" also capture CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_options(o: dict[str, Any]) -> None:
    """The pretraining module's options (``PretrainModule``'s arguments by name), each error naming its
    option; the non-finite guard checks its own two."""
    if o["learning_rate"] <= 0:
        raise UserError(f"model.learning_rate must be positive, got {o['learning_rate']}")
    if not 0.0 <= o["warmup_fraction"] < 1.0:
        raise UserError(f"model.warmup_fraction must be in [0, 1), got {o['warmup_fraction']}")
    if o["lr_schedule"] not in SCHEDULES:
        raise UserError(f"model.lr_schedule must be one of {', '.join(SCHEDULES)}, got {o['lr_schedule']!r}")
    if not 0.0 < o["decay_fraction"] <= 1.0:
        raise UserError(f"model.decay_fraction must be in (0, 1], got {o['decay_fraction']}")
    if o["schedule_by"] not in ("steps", "time"):
        raise UserError(f"model.schedule_by must be 'steps' or 'time', got {o['schedule_by']!r}")
    if o["optimizer"] not in OPTIMIZERS:
        raise UserError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {o['optimizer']!r}")
    adamw_implementation(o["optimizer_implementation"], device_type="cpu")  # checks the name
    if o["vocab_multiple_of"] < 1:
        raise UserError(f"model.vocab_multiple_of must be at least 1, got {o['vocab_multiple_of']}")
    if o["context_gain_batches"] < 0:
        raise UserError(f"model.context_gain_batches must be 0 or more, got {o['context_gain_batches']}")
    if not 0.0 <= o["plateau_check_fraction"] <= 1.0:
        raise UserError(f"model.plateau_check_fraction must be in [0, 1], got {o['plateau_check_fraction']}")
    if o["compile_mode"] is not None and o["compile_mode"] not in COMPILE_MODES:
        raise UserError(f"model.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {o['compile_mode']!r}")
    if o["compile_mode"] is not None and not o["compile"]:
        raise UserError(f"model.compile_mode {o['compile_mode']} needs model.compile: true")
