"""Checkpoints to and from HuggingFace directories.

- ``export_checkpoint``: a bertpre ``.ckpt`` -> a directory that transformers loads as is
  (config.json, model.safetensors, tokenizer files): a pretraining checkpoint as
  ``BertForPreTraining``, a fine-tuning checkpoint as ``BertForSequenceClassification`` with
  its label names (``id2label``); a pre-LN model as ``RobertaPreLayerNormForMaskedLM`` /
  ``RobertaPreLayerNormForSequenceClassification`` (the same computation; no NSP head).
- ``import_hf``: a BertForPreTraining / BertForMaskedLM / BertModel directory -> a bertpre
  checkpoint for ``model.init_from`` (continued pretraining); missing heads are
  initialised as BERT does and reported.
- ``load_pretrained`` (in ``bertpre.model.checkpoint``): the model and tokenizer from either.

Weights are read with safetensors or ``torch.load(weights_only=True)``; nothing from a
checkpoint or a directory is executed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

import bertpre
from bertpre.data.tokenizer import SPECIAL_TOKENS, save_tokenizer, special_ids, vocab_fingerprint
from bertpre.errors import UserError
from bertpre.model.bert import BertForPretraining
from bertpre.model.checkpoint import (
    CHECKPOINT_KEY,
    MODEL_PREFIX,
    TASK_KEY,
    build_model,
    load_classifier,
    model_state,
    read_checkpoint,
)
from bertpre.model.hf import (
    HF_TIED,
    PRE_LN,
    from_hf_state_dict,
    hf_config,
    pre_ln_hf_config,
    read_hf_dir,
    to_hf_name,
    to_hf_state_dict,
    to_pre_ln_hf_state_dict,
)
from bertpre.outputs import atomic_write, check_apart, check_replaceable, output_lock, staged_output


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
    """Write a transformers-loadable directory for a bertpre pretraining or fine-tuning checkpoint."""
    output = Path(output)
    check_apart(output, [checkpoint_path])
    check_replaceable(output, overwrite, "folder")
    checkpoint = read_checkpoint(checkpoint_path, key=(CHECKPOINT_KEY, TASK_KEY),
                                 kind="bertpre pretraining or fine-tuning")
    meta = checkpoint.get(CHECKPOINT_KEY) or checkpoint[TASK_KEY]
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    pad = special_ids(tokenizer).pad
    pre_ln = meta["model_config"].get("norm_placement", "post") == "pre"
    if CHECKPOINT_KEY in checkpoint:
        model = build_model(meta["model_config"], model_state(checkpoint), f"checkpoint {checkpoint_path}")
        if pre_ln:
            weights = to_pre_ln_hf_state_dict(model.state_dict(), pad)
            config = pre_ln_hf_config(model.config, pad_token_id=pad)
        else:
            weights = {k: v for k, v in to_hf_state_dict(model.state_dict()).items() if k not in HF_TIED}
            config = hf_config(model.config, pad_token_id=pad)
            if model.nsp is None:  # pretrained without a sentence head (--objective none): MLM only
                config["architectures"] = ["BertForMaskedLM"]
    else:
        classifier, tokenizer, task = load_classifier(checkpoint_path)
        if classifier.pooling != "cls":
            raise UserError(f"checkpoint {checkpoint_path}: fine-tuned with model.pooling {classifier.pooling}; "
                            "transformers' sequence classifiers read the pooled [CLS] vector, so none holds this "
                            "model exactly (use `bertpre predict`, or fine-tune with model.pooling cls to export)")
        encoder = classifier.encoder.state_dict()
        head = classifier.classifier.state_dict()
        if pre_ln:  # RoBERTa's classification head: dense + tanh (bertpre's pooler), then out_proj
            weights = {k: v for k, v in to_pre_ln_hf_state_dict(encoder, pad).items() if k.startswith(PRE_LN)}
            weights.update({f"classifier.dense.{k}": encoder[f"pooler.{k}"] for k in ("weight", "bias")})
            weights.update({f"classifier.out_proj.{k}": v for k, v in head.items()})
            config = pre_ln_hf_config(classifier.config, pad_token_id=pad)
        else:
            weights = {to_hf_name(k): v for k, v in encoder.items()}
            weights.update({f"classifier.{k}": v for k, v in head.items()})
            config = hf_config(classifier.config, pad_token_id=pad)
        labels = task["labels"]
        config.update(architectures=[f"{'RobertaPreLayerNorm' if pre_ln else 'Bert'}ForSequenceClassification"],
                      id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
                      problem_type="single_label_classification",
                      classifier_dropout=task.get("classifier_dropout", config["hidden_dropout_prob"]))
        model = classifier
    config["bertpre_version"] = bertpre.__version__
    with staged_output(output, overwrite, inputs=[checkpoint_path]) as staging:
        weights = {k: v.contiguous() for k, v in weights.items()}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_tokenizer(tokenizer, staging)
        tokenizer_config = _hf_tokenizer_config(tokenizer, model.config.max_position_embeddings)
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        specials = {k: v for k, v in tokenizer_config.items() if k.endswith("_token")}
        (staging / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return output


def import_hf(directory: str | Path, output: str | Path, overwrite: bool = False) -> list[str]:
    """Write a bertpre checkpoint from a HuggingFace BERT directory; returns what was initialised."""
    directory, output = Path(directory), Path(output)
    check_apart(output, [directory])
    check_replaceable(output, overwrite, "file")
    config, weights, tokenizer = read_hf_dir(directory)
    special_ids(tokenizer, f"{directory} tokenizer")
    try:
        state = from_hf_state_dict({k: v for k, v in weights.items() if not k.endswith("position_ids")})
    except KeyError as e:
        raise UserError(f"{directory}: {e.args[0]}; not a BERT checkpoint bertpre can read") from None
    model = BertForPretraining.randomly_initialised(config)  # what the directory lacks: a fixed seed's draw
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
