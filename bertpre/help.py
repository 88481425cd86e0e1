"""Short ``--help`` for ``bertpre train`` and ``bertpre finetune``: bertpre's own options first,
from the classes' signatures and docstrings, and the few trainer options people set. Lightning's
full list stays one flag away (``--help-all``)."""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import fields

# trainer options worth listing in the short help, with what they mean in a bertpre run
TRAINER_OPTIONS = {
    "default_root_dir": "run folder: checkpoints/, logs/version_N/ (metrics.csv, TensorBoard)",
    "max_steps": "optimizer steps to train (the learning-rate schedule spans them)",
    "max_time": "wall-clock budget DD:HH:MM:SS; with --model.schedule_by time the schedule spans it",
    "max_epochs": "passes over the training file (fine-tuning)",
    "accelerator": "auto, cpu, gpu",
    "devices": "devices per node (auto: all visible)",
    "num_nodes": "machines in a multi-node run",
    "precision": "32, bf16-mixed, 16-mixed",
    "accumulate_grad_batches": "micro-batches per optimizer step",
    "gradient_clip_val": "clip the gradient norm to this (null: no clipping)",
    "val_check_interval": "validate every N steps",
    "limit_val_batches": "validation batches per validation (a number or a share)",
    "log_every_n_steps": "steps between logged training metrics",
    "enable_progress_bar": "false for logs without a progress bar",
}


def _arguments(function) -> dict[str, str]:
    """``name: description`` from a Google-style ``Args:`` docstring (first sentence only)."""
    doc = inspect.getdoc(function) or ""
    found: dict[str, str] = {}
    name = None
    for line in doc.split("Args:", 1)[-1].splitlines():
        match = re.match(r"^\s{4}(\w+):\s*(.*)$", line)
        if match:
            name = match.group(1)
            found[name] = match.group(2)
        elif name and line.startswith("        "):
            found[name] += " " + line.strip()
    return {k: re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", v)[0] for k, v in found.items()}


def _default(value) -> str:
    return "required" if value is inspect.Parameter.empty else repr(value) if isinstance(value, str) else str(value)


def _options(prefix: str, cls, width: int) -> list[str]:
    described = _arguments(cls.__init__)
    lines = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name == "config":
            continue
        head = f"  --{prefix}.{name} ({_default(parameter.default)})"
        wrapped = textwrap.wrap(f"{head}  {described.get(name, '')}", width, subsequent_indent=" " * 6)
        lines += wrapped[:2] if len(wrapped) <= 2 else [*wrapped[:1], wrapped[1][: width - 3] + "..."]
    return lines


def short_help(command: str, model_class, data_class, width: int = 110) -> str:
    lines = [f"usage: bertpre {command} --config FILE.yaml [--section.option VALUE ...]", ""]
    lines += ["Every option can be set in the YAML config or here; the command line wins.",
              "  --config FILE          a YAML config (see configs/); repeatable, later files win",
              "  --print_config         print the merged config and exit",
              "  --ckpt_path PATH       resume: a checkpoint file, 'last' (the run's newest) or 'last-good' (its newest undamaged)"
              if command == "train" else
              "  --ckpt_path PATH       resume an interrupted fine-tuning run from a checkpoint",
              "  --overwrite true       start afresh in a run folder holding another run's checkpoints, deleting them",
              "  --help-all             every option, Lightning's trainer options included", ""]
    lines.append("model:")
    lines += _options("model", model_class, width)
    if "config" in inspect.signature(model_class.__init__).parameters:
        from bertpre.model.bert import BertConfig

        names = ", ".join(f.name for f in fields(BertConfig))
        lines += textwrap.wrap(f"--model.config.NAME: architecture fields {names} (or a preset in the "
                               "config files)", width, initial_indent="  ", subsequent_indent="    ")
    lines += ["", "data:"] + _options("data", data_class, width)
    lines += ["", "trainer (Lightning's; the most used):"]
    lines += [f"  --trainer.{name}  {text}" for name, text in TRAINER_OPTIONS.items()]
    return "\n".join(lines)
