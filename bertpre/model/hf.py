"""bertpre's model and transformers' BERT: the name map (``BertForPreTraining`` and
``BertForSequenceClassification``; pre-LN models: ``RobertaPreLayerNormForMaskedLM`` and
``...ForSequenceClassification``), the config both ways, and reading a HuggingFace directory.

One entry per parameter, both directions; the MLM decoder weight is the word-embedding
matrix (tied), so it has no entry of its own here and HF's copy is dropped on import.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor

from bertpre.errors import UserError
from bertpre.model.bert import BertConfig, BertForPretraining

GLOBAL_NAMES = {
    "embeddings.word.weight": "bert.embeddings.word_embeddings.weight",
    "embeddings.position.weight": "bert.embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "bert.embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "mlm_dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_bias": "cls.predictions.bias",
    "nsp.weight": "cls.seq_relationship.weight",
    "nsp.bias": "cls.seq_relationship.bias",
}
LAYER_NAMES = {  # under layers.N. -> under bert.encoder.layer.N.
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
HF_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(\w+)\.(weight|bias)")
_HF_LAYER = re.compile(r"bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_HF_TO_LAYER = {hf: ours for ours, hf in LAYER_NAMES.items()}
_HF_TO_GLOBAL = {hf: ours for ours, hf in GLOBAL_NAMES.items()}


def _renamed(name: str, global_names: dict[str, str], layer_names: dict[str, str], encoder: str) -> str:
    """bertpre's parameter name under one of the transformers name maps."""
    if name in global_names:
        return global_names[name]
    m = _OURS_LAYER.fullmatch(name)
    if m is None or m.group(2) not in layer_names:
        raise KeyError(f"no transformers name under {encoder} for parameter {name!r}")
    return f"{encoder}.layer.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"


def to_hf_name(name: str) -> str:
    return _renamed(name, GLOBAL_NAMES, LAYER_NAMES, "bert.encoder")


def from_hf_name(name: str) -> str:
    if name in _HF_TO_GLOBAL:
        return _HF_TO_GLOBAL[name]
    m = _HF_LAYER.fullmatch(name)
    if m is None or m.group(2) not in _HF_TO_LAYER:
        raise KeyError(f"no bertpre name for HuggingFace parameter {name!r}")
    return f"layers.{m.group(1)}.{_HF_TO_LAYER[m.group(2)]}.{m.group(3)}"


def to_hf_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    hf = {to_hf_name(name): tensor for name, tensor in state_dict.items()}
    hf["cls.predictions.decoder.weight"] = hf["bert.embeddings.word_embeddings.weight"]
    return hf


def from_hf_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    skipped = set(HF_TIED) | {"bert.embeddings.position_ids"}
    return {from_hf_name(name): t for name, t in state_dict.items() if name not in skipped}


def hf_config(config: BertConfig, pad_token_id: int) -> dict:
    """A transformers ``BertConfig`` as a dict (the content of config.json)."""
    return {
        "model_type": "bert",
        "architectures": ["BertForPreTraining"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


# Pre-LN: transformers' RoBERTa-PreLayerNorm classes hold the same computation (LayerNorm before
# each sublayer, one after the last layer, learned positions and token types, the same MLM head).
# Two differences the export absorbs: positions count from pad_token_id + 1 (the table gets that
# many unused rows in front), and there is no NSP head (the MaskedLM class; the classification
# class's head is bertpre's pooler + classifier under other names).
PRE_LN = "roberta_prelayernorm"
PRE_LN_GLOBAL_NAMES = {
    "embeddings.word.weight": f"{PRE_LN}.embeddings.word_embeddings.weight",
    "embeddings.position.weight": f"{PRE_LN}.embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": f"{PRE_LN}.embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": f"{PRE_LN}.embeddings.LayerNorm.weight",
    "embeddings.norm.bias": f"{PRE_LN}.embeddings.LayerNorm.bias",
    "final_norm.weight": f"{PRE_LN}.LayerNorm.weight",
    "final_norm.bias": f"{PRE_LN}.LayerNorm.bias",
    "mlm_dense.weight": "lm_head.dense.weight",
    "mlm_dense.bias": "lm_head.dense.bias",
    "mlm_norm.weight": "lm_head.layer_norm.weight",
    "mlm_norm.bias": "lm_head.layer_norm.bias",
    "mlm_bias": "lm_head.bias",
}
PRE_LN_LAYER_NAMES = {  # under layers.N. -> under roberta_prelayernorm.encoder.layer.N.
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_out": "attention.output.dense",
    "attention_norm": "attention.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_norm": "intermediate.LayerNorm",
    "ffn_out": "output.dense",
}
PRE_LN_NOT_EXPORTED = ("pooler.weight", "pooler.bias", "nsp.weight", "nsp.bias")  # no place in the MaskedLM class


def to_pre_ln_hf_state_dict(state_dict: dict[str, Tensor], pad_token_id: int) -> dict[str, Tensor]:
    """A pre-LN model's weights under RobertaPreLayerNormForMaskedLM's names (decoder tied, not listed)."""
    hf = {_renamed(name, PRE_LN_GLOBAL_NAMES, PRE_LN_LAYER_NAMES, f"{PRE_LN}.encoder"): tensor
          for name, tensor in state_dict.items() if name not in PRE_LN_NOT_EXPORTED}
    positions = hf[PRE_LN_GLOBAL_NAMES["embeddings.position.weight"]]  # (P, H)
    unused = positions.new_zeros(pad_token_id + 1, positions.shape[1])  # ids 0..pad: never a real token's position
    hf[PRE_LN_GLOBAL_NAMES["embeddings.position.weight"]] = torch.cat([unused, positions])  # (pad + 1 + P, H)
    return hf


def pre_ln_hf_config(config: BertConfig, pad_token_id: int) -> dict:
    """A transformers ``RobertaPreLayerNormConfig`` as a dict, for the same pre-LN model."""
    hf = hf_config(config, pad_token_id)
    hf.update(model_type="roberta-prelayernorm", architectures=["RobertaPreLayerNormForMaskedLM"],
              max_position_embeddings=config.max_position_embeddings + pad_token_id + 1)
    return hf


def config_from_hf(hf: dict) -> BertConfig:
    """bertpre's config from a transformers ``BertConfig`` dict (the inverse of ``hf_config``)."""
    return BertConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), initializer_range=hf.get("initializer_range", 0.02),
    )


def read_hf_dir(directory: Path) -> tuple[BertConfig, dict[str, Tensor], Tokenizer]:
    """Config, weights (HF names, ``bert.`` prefix added where a BertModel lacks it) and tokenizer of a
    HuggingFace BERT directory; safetensors or ``torch.load(weights_only=True)``, nothing executed."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json; not a HuggingFace model directory")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    if hf.get("model_type") != "bert":
        raise UserError(f"{config_path}: model_type is {hf.get('model_type')!r}, bertpre reads BERT ('bert') only")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{config_path}: only hidden_act 'gelu' and absolute positions are supported")
    config = config_from_hf(hf)
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
    # without pooler and sentence head (BertForMaskedLM's, as `--objective none` exports) the model has
    # none; with either, BertForPreTraining's heads (what the directory lacks is initialised by import)
    config = replace(config, sentence_head=any(k.startswith(("cls.seq_relationship.", "bert.pooler.")) for k in weights))
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").is_file():
        from bertpre.data.tokenizer import load_tokenizer

        lowercase = json.loads((directory / "tokenizer_config.json").read_text()).get("do_lower_case", True) \
            if (directory / "tokenizer_config.json").is_file() else True
        tokenizer = load_tokenizer(directory / "vocab.txt", lowercase=lowercase)
    else:
        raise UserError(f"{directory}: no tokenizer.json or vocab.txt")
    return config, weights, tokenizer


def to_transformers(model: BertForPretraining, pad_token_id: int, attn_implementation: str | None = None):
    """A transformers ``BertForPreTraining`` with ``model``'s config and weights (for comparisons)."""
    try:
        import transformers
    except ImportError:
        raise UserError("this compares with transformers: pip install 'bertpre[bench]'") from None
    hf = hf_config(model.config, pad_token_id=pad_token_id)
    peer = transformers.BertForPreTraining(transformers.BertConfig(**hf, attn_implementation=attn_implementation))
    missing, unexpected = peer.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert not unexpected and all(k.endswith(("position_ids", "decoder.bias")) for k in missing), (missing, unexpected)
    return peer.train(model.training)
