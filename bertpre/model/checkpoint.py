"""Checkpoint files, without Lightning: reading them safely and checked, finding a run's
checkpoints, taking a model's weights out of them, and building the model they hold
(``load_pretrained`` for a pretraining checkpoint or a HuggingFace directory,
``load_classifier`` for a fine-tuning checkpoint).

Every command that reads a checkpoint (train's ``ckpt_path`` and ``model.init_from``,
export, finetune, predict, the probes) goes through ``read_checkpoint``: the file must be a
complete archive whose members pass their checksums, it is loaded with
``weights_only=True`` (tensors and plain data only, nothing in it runs), and it must carry
the entry that says what wrote it.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from bertpre.errors import UserError
from bertpre.model.bert import DROPOUT_FIELDS, BertConfig, BertForPretraining, BertForSequenceClassification
from bertpre.model.hf import from_hf_state_dict, read_hf_dir

CHECKPOINT_KEY = "bertpre"  # written by `bertpre train` / `bertpre import`
TASK_KEY = "bertpre_task"  # written by `bertpre finetune`
MODEL_PREFIX = "model."  # the model's weights inside a checkpoint's state_dict
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


def read_checkpoint(path: str | Path, key: str | tuple[str, ...] = CHECKPOINT_KEY,
                    kind: str = "bertpre") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only) after checking that it is whole
    (every member passes its checksum) and that it carries ``key`` (or one of several)."""
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
    keys = (key,) if isinstance(key, str) else key
    if not isinstance(checkpoint, dict) or not any(k in checkpoint for k in keys):
        raise UserError(f"checkpoint {path}: not a {kind} checkpoint (no {' or '.join(map(repr, keys))} entry)")
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


def build_model(config: dict, state: dict[str, torch.Tensor], source: str,
                dropout: dict[str, float] | None = None) -> BertForPretraining:
    """A pretraining model (eval mode) from a config dict and its weights, checked to fit;
    ``dropout`` replaces the config's ``hidden_dropout`` / ``attention_dropout`` (not the weights)."""
    known = {f.name for f in fields(BertConfig)}
    if set(config) - known:
        raise UserError(f"{source}: model config has unknown fields {sorted(set(config) - known)}")
    assert set(dropout or {}) <= set(DROPOUT_FIELDS), dropout
    model = BertForPretraining(BertConfig(**{**config, **(dropout or {})}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit a bertpre BERT (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); a model without the pretraining heads needs `bertpre import` first")
    return model.eval()


def load_pretrained(path: str | Path, dropout: dict[str, float] | None = None) -> tuple[BertForPretraining, Tokenizer]:
    """The pretrained model (in eval mode) and its tokenizer, from a bertpre ``.ckpt`` or an
    exported / HuggingFace BERT directory. ``model.encode(...)`` gives hidden states (B, T, H)
    and ``model.pool(hidden)`` the pooled [CLS] vector (B, H), for a task head of your own.
    ``dropout`` ({"hidden_dropout": p, "attention_dropout": p}, either or both) replaces the
    rates the model was pretrained with, for training it further (fine-tuning)."""
    path = Path(path)
    if path.is_dir():
        config, weights, tokenizer = read_hf_dir(path)
        state = from_hf_state_dict({k: v for k, v in weights.items() if not k.endswith("position_ids")})
        return build_model(asdict(config), state, str(path), dropout), tokenizer
    checkpoint = read_checkpoint(path)
    meta = checkpoint[CHECKPOINT_KEY]
    return (build_model(meta["model_config"], model_state(checkpoint), str(path), dropout),
            Tokenizer.from_str(meta["tokenizer"]))


def load_classifier(path: str | Path) -> tuple[BertForSequenceClassification, Tokenizer, dict[str, Any]]:
    """A fine-tuned classifier (eval mode), its tokenizer and its task record (labels, columns)
    from a checkpoint written by ``bertpre finetune``."""
    checkpoint = read_checkpoint(path, key=TASK_KEY, kind="`bertpre finetune`")
    task = checkpoint[TASK_KEY]
    state = checkpoint["state_dict"]
    if any(k.startswith(MODEL_PREFIX) for k in state):
        state = strip_prefix(state, MODEL_PREFIX)
    model = BertForSequenceClassification(BertForPretraining(BertConfig(**task["model_config"])), len(task["labels"]),
                                          pooling=task.get("pooling", "cls"))  # no "pooling": written before it existed
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path}: weights do not fit its classifier (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.eval(), Tokenizer.from_str(task["tokenizer"]), task
