"""Checkpoints to and from HuggingFace directories, and loading a pretrained encoder.

- ``export_checkpoint``: a bertpre ``.ckpt`` -> a directory that transformers loads as is
  (config.json, model.safetensors with BertForPreTraining names, tokenizer files).
- ``import_hf``: a BertForPreTraining / BertForMaskedLM / BertModel directory -> a bertpre
  checkpoint for ``model.init_from`` (continued pretraining); missing heads are
  initialised as BERT does and reported.
- ``load_pretrained``: the model and tokenizer from either.

Weights are read with safetensors or ``torch.load(weights_only=True)``; nothing from a
checkpoint or a directory is executed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import bertpre
from bertpre.checkpoint import CHECKPOINT_KEY, MODEL_PREFIX, model_state, read_checkpoint
from bertpre.errors import UserError
from bertpre.hf import HF_TIED, from_hf_state_dict, hf_config, to_hf_state_dict
from bertpre.model import BertConfig, BertForPretraining
from bertpre.outputs import atomic_write, check_apart, check_replaceable, output_lock, staged_output
from bertpre.tokenizer import SPECIAL_TOKENS, save_tokenizer, special_ids, vocab_fingerprint

def _build(config: dict, state: dict[str, torch.Tensor], source: str) -> BertForPretraining:
    known = {f.name for f in fields(BertConfig)}
    if set(config) - known:
        raise UserError(f"{source}: model config has unknown fields {sorted(set(config) - known)}")
    model = BertForPretraining(BertConfig(**config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit a bertpre BERT (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); a model without the pretraining heads needs `bertpre import` first")
    return model.eval()


def _hf_tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS))
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": bool(normalizer.get("lowercase", True)),
        "strip_accents": normalizer.get("strip_accents"),
        "tokenize_chinese_chars": bool(normalizer.get("handle_chinese_chars", True)),
        "model_max_length": model_max_length,
        **names,
    }


def export_checkpoint(checkpoint_path: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write a transformers-loadable directory for a bertpre checkpoint."""
    output = Path(output)
    check_apart(output, [checkpoint_path])
    check_replaceable(output, overwrite, "folder")
    checkpoint = read_checkpoint(checkpoint_path)
    meta = checkpoint[CHECKPOINT_KEY]
    if meta["model_config"].get("norm_placement", "post") != "post":
        raise UserError(f"checkpoint {checkpoint_path}: a pre-LN model (model.config.norm_placement pre) has no "
                        "exact HuggingFace BERT class, so it is not exported; load_pretrained, bertpre finetune and "
                        "bertpre predict read it")
    model = _build(meta["model_config"], model_state(checkpoint), f"checkpoint {checkpoint_path}")
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    with staged_output(output, overwrite, inputs=[checkpoint_path]) as staging:
        weights = {k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict()).items() if k not in HF_TIED}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config(model.config, pad_token_id=special_ids(tokenizer).pad)
        config["bertpre_version"] = bertpre.__version__
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_tokenizer(tokenizer, staging)
        tokenizer_config = _hf_tokenizer_config(tokenizer, model.config.max_position_embeddings)
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        specials = {k: v for k, v in tokenizer_config.items() if k.endswith("_token")}
        (staging / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return output


def _read_hf_dir(directory: Path) -> tuple[BertConfig, dict[str, torch.Tensor], Tokenizer]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json; not a HuggingFace model directory")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    if hf.get("model_type") != "bert":
        raise UserError(f"{config_path}: model_type is {hf.get('model_type')!r}, bertpre reads BERT ('bert') only")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{config_path}: only hidden_act 'gelu' and absolute positions are supported")
    config = BertConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), initializer_range=hf.get("initializer_range", 0.02),
    )
    if (directory / "model.safetensors").is_file():
        try:
            weights = load_file(str(directory / "model.safetensors"))
        except Exception:  # truncated or damaged: safetensors raises its own error types
            raise UserError(f"{directory / 'model.safetensors'}: not a readable safetensors file "
                            "(truncated or damaged)") from None
    elif (directory / "pytorch_model.bin").is_file():
        try:
            weights = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{directory / 'pytorch_model.bin'}: not loadable as plain tensors ({type(e).__name__})") from None
    else:
        raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin")
    # BertModel / BertForMaskedLM checkpoints name the encoder without or with "bert."
    weights = {(k if k.startswith(("bert.", "cls.")) else f"bert.{k}"): v for k, v in weights.items()}
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").is_file():
        from bertpre.tokenizer import load_tokenizer

        lowercase = json.loads((directory / "tokenizer_config.json").read_text()).get("do_lower_case", True) \
            if (directory / "tokenizer_config.json").is_file() else True
        tokenizer = load_tokenizer(directory / "vocab.txt", lowercase=lowercase)
    else:
        raise UserError(f"{directory}: no tokenizer.json or vocab.txt")
    return config, weights, tokenizer


def import_hf(directory: str | Path, output: str | Path, overwrite: bool = False) -> list[str]:
    """Write a bertpre checkpoint from a HuggingFace BERT directory; returns what was initialised."""
    directory, output = Path(directory), Path(output)
    check_apart(output, [directory])
    check_replaceable(output, overwrite, "file")
    config, weights, tokenizer = _read_hf_dir(directory)
    special_ids(tokenizer, f"{directory} tokenizer")
    try:
        state = from_hf_state_dict({k: v for k, v in weights.items() if not k.endswith("position_ids")})
    except KeyError as e:
        raise UserError(f"{directory}: {e.args[0]}; not a BERT checkpoint bertpre can read") from None
    torch.manual_seed(0)
    model = BertForPretraining(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise UserError(f"{directory}: unexpected weights {unexpected[:3]}")
    encoder_missing = [m for m in missing if m.startswith(("embeddings.", "layers."))]
    if encoder_missing:
        raise UserError(f"{directory}: encoder weights missing ({encoder_missing[:3]})")
    checkpoint = {
        "state_dict": {MODEL_PREFIX + k: v for k, v in model.state_dict().items()},
        CHECKPOINT_KEY: {
            "bertpre_version": bertpre.__version__,
            "model_config": asdict(config),
            "tokenizer": tokenizer.to_str(),
            "tokenizer_fingerprint": vocab_fingerprint(tokenizer),
            "imported_from": str(directory),
        },
    }
    with output_lock(output):
        atomic_write(output, lambda f: torch.save(checkpoint, f), what=f"--output {output}")
    return sorted(missing)


def load_pretrained(path: str | Path) -> tuple[BertForPretraining, Tokenizer]:
    """The pretrained model (in eval mode) and its tokenizer, from a bertpre ``.ckpt`` or an
    exported / HuggingFace BERT directory. ``model.encode(...)`` gives hidden states (B, T, H)
    and ``model.pool(hidden)`` the pooled [CLS] vector (B, H), for a task head of your own."""
    path = Path(path)
    if path.is_dir():
        config, weights, tokenizer = _read_hf_dir(path)
        state = from_hf_state_dict({k: v for k, v in weights.items() if not k.endswith("position_ids")})
        return _build(asdict(config), state, str(path)), tokenizer
    checkpoint = read_checkpoint(path)
    meta = checkpoint[CHECKPOINT_KEY]
    return _build(meta["model_config"], model_state(checkpoint), str(path)), Tokenizer.from_str(meta["tokenizer"])

