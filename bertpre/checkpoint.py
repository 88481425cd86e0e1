"""Checkpoint files, without Lightning: reading them safely and checked, finding a run's
checkpoints, and taking a model's weights out of them.

Every command that reads a checkpoint (train's ``ckpt_path`` and ``model.init_from``,
export, finetune, predict, the probes) goes through ``read_checkpoint``: the file must be a
complete archive whose members pass their checksums, it is loaded with
``weights_only=True`` (tensors and plain data only, nothing in it runs), and it must carry
the entry that says what wrote it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from bertpre.errors import UserError

CHECKPOINT_KEY = "bertpre"  # written by `bertpre train` / `bertpre import`
MODEL_PREFIX = "model."  # the pretraining model's weights inside a checkpoint's state_dict
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers, if a checkpoint has them


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a complete checkpoint (None if it can): torch saves a zip
    archive, whose central directory and member checksums reveal truncation and corruption."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"truncated or not a checkpoint: {e}"
    except Exception as e:  # zlib / struct errors from a damaged member
        return f"corrupt: {type(e).__name__}"
    return f"corrupt: member {bad} fails its checksum" if bad else None


def read_checkpoint(path: str | Path, key: str = CHECKPOINT_KEY, kind: str = "bertpre") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only) after checking that it is whole
    (every member passes its checksum) and that it carries ``key``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: not found")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path}: not a readable checkpoint (not an archive written by torch.save)")
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"checkpoint {path}: {problem}; it was damaged after it was written")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {path}: not a readable checkpoint (it holds objects other than tensors and "
                        "plain data; such files are never loaded)") from None
    except Exception as e:
        raise UserError(f"checkpoint {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or key not in checkpoint:
        raise UserError(f"checkpoint {path}: not a {kind} checkpoint (no '{key}' entry)")
    return checkpoint


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, without it and without compile / DDP wrapper
    prefixes: the state dict of the sub-module that ``prefix`` names."""
    out = {}
    for name, tensor in state.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        for wrapper in _WRAPPER_PREFIXES:
            name = name.replace(wrapper, "")
        out[name] = tensor
    return out


def model_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The pretraining model's weights from a checkpoint read by ``read_checkpoint``."""
    return strip_prefix(checkpoint["state_dict"], MODEL_PREFIX)


def _step_of(path: Path) -> int:
    digits = path.stem.rsplit("step=", 1)[-1] if "step=" in path.stem else ""
    return int(digits) if digits.isdigit() else -1


def checkpoint_dir(trainer) -> Path:
    """Where a run's checkpoints go: the checkpoint callback's folder, else ``<run>/checkpoints``."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


def run_checkpoints(directory: Path) -> list[Path]:
    """The checkpoints in a run's checkpoint folder, oldest first (by modification time, with
    ``last.ckpt`` after a step file of the same time, then by step)."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt", _step_of(p)))


def newest_good_checkpoint(directory: Path, exclude: Path | None = None) -> Path | None:
    """The newest complete checkpoint in ``directory``."""
    candidates = [p for p in reversed(run_checkpoints(directory)) if p != exclude]
    return next((p for p in candidates if checkpoint_problem(p) is None), None)
