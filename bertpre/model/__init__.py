"""BERT in plain PyTorch (bert), HuggingFace's names and directories (hf), reading checkpoints
and building the models they hold without Lightning (checkpoint), export and import (export)."""
