"""BERT for pretraining (masked-LM + next-sentence prediction), in plain PyTorch.

Post-LN encoder (or pre-LN with ``norm_placement="pre"``), learned absolute positions,
exact (erf) GELU, a pooler on [CLS], an MLM head whose decoder is tied to the word
embeddings, and an NSP head. Every parameter of the post-LN model has a counterpart in
transformers' ``BertForPreTraining`` (see ``bertpre.model.hf``). The loss is
computed outside the model (``bertpre.training.loss``). Shapes: B batch, T tokens, H hidden,
N heads, D head size, V vocabulary, P predicted positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bertpre.errors import UserError


def check_dropout(option: str, rate: float) -> None:
    """A dropout rate is in [0, 1); the error names the option that set it."""
    if not 0.0 <= rate < 1.0:
        raise UserError(f"{option} must be in [0, 1), got {rate}")


DROPOUT_FIELDS = ("hidden_dropout", "attention_dropout")
# what only draws initial weights: meaningless once a checkpoint's weights are loaded
INIT_ONLY_FIELDS = ("initializer_range", "position_init")


def config_differences(saved: dict, ours: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The fields (``ignore`` excepted) in which two model configs as saved (``asdict(BertConfig)``)
    differ; a field one of them lacks (an older checkpoint) counts as differing, unless ADDED_FIELDS
    says what its absence means."""
    def value(config: dict, key: str):
        return config.get(key, ADDED_FIELDS.get(key))
    return sorted(k for k in saved.keys() | ours.keys() if k not in ignore and value(saved, k) != value(ours, k))


ADDED_FIELDS = {"sentence_head": True}  # fields added to BertConfig, and what a config written before them held


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int | None = None  # None: the vocabulary size of the prepared data's tokenizer
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    norm_placement: str = "post"  # "post": BERT's (exact HF export); "pre": LayerNorm before each sublayer
    # initial position embeddings: "normal" (BERT's, std initializer_range) or "sinusoidal" (the
    # Transformer's sin/cos table scaled to the same std: relative offsets are a linear map from the
    # start, which attention can use before it has learned positions). Training and export are unchanged.
    position_init: str = "normal"
    # the pooler and the 2-way sentence head (NSP's or SOP's): absent for data prepared with
    # --objective none (MLM only; exported as transformers' BertForMaskedLM). Set from the data;
    # a checkpoint written before the field existed has the head.
    sentence_head: bool | None = None  # None: follows the data (true for nsp and sop)

    def __post_init__(self) -> None:
        if self.norm_placement not in ("post", "pre"):
            raise UserError(f"model.config.norm_placement must be 'post' or 'pre', got {self.norm_placement!r}")
        if self.position_init not in ("normal", "sinusoidal"):
            raise UserError(f"model.config.position_init must be 'normal' or 'sinusoidal', got {self.position_init!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in DROPOUT_FIELDS:
                check_dropout(f"model.config.{f.name}", value)
            elif f.name not in ("layer_norm_eps", "initializer_range", "norm_placement", "position_init",
                                "sentence_head") and value is not None and value <= 0:
                raise UserError(f"model.config.{f.name} must be positive, got {value}")
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model.config.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )

    def for_data(self, labelled: bool, source: str) -> BertConfig:
        """The config with its sentence head following the data (``labelled``: NSP's or SOP's pairs
        with their labels); one that asks for what the data does not have is refused, naming
        ``source`` ("DIR was prepared with --objective X")."""
        if self.sentence_head is None:
            return replace(self, sentence_head=labelled)
        if self.sentence_head != labelled:
            has = "sentence labels" if labelled else "no sentence label (MLM only)"
            raise UserError(f"model.config.sentence_head is {str(self.sentence_head).lower()} but {source}: its "
                            f"sequences have {has} (leave model.config.sentence_head unset: it follows the data)")
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BertConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    "bert-tiny": BertConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
    "bert-mini": BertConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "bert-small": BertConfig(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "bert-medium": BertConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
    "bert-base": BertConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "bert-large": BertConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


def sinusoidal_positions(positions: int, hidden: int, std: float) -> Tensor:
    """The Transformer's position table (sin on even, cos on odd features, wavelengths 2pi to
    10000 * 2pi), scaled so its entries have standard deviation ``std``: (positions, hidden)."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]  # (T, 1)
    frequency = torch.exp(torch.arange(0, hidden, 2, dtype=torch.float64) * (-torch.log(torch.tensor(1e4)) / hidden))
    table = torch.zeros(positions, hidden, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: hidden // 2])
    return (table * (std / table.std())).float()


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        assert c.vocab_size is not None
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)  # (B, T, H)
        return self.dropout(self.norm(x))


class EncoderLayer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.pre_norm = c.norm_placement == "pre"
        self.num_heads = c.num_heads
        self.attention_dropout = c.attention_dropout
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.attention_out = nn.Linear(c.hidden_size, c.hidden_size)
        self.attention_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(c.hidden_size, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, c.hidden_size)
        self.ffn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, H = x.shape
        return x.view(B, T, self.num_heads, H // self.num_heads).transpose(1, 2)  # (B, N, T, D)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        if self.pre_norm:  # x + sublayer(norm(x)); the encoder normalises the last layer's output
            x = x + self.dropout(self._attention(self.attention_norm(x), key_mask))
            return x + self.dropout(self._ffn(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(self._attention(x, key_mask)))  # BERT: norm(x + sublayer(x))
        return self.ffn_norm(x + self.dropout(self._ffn(x)))

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v from one product (the three weights side by side), kept as three HF-named modules."""
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias])  # (3H,)
        q, k, v = F.linear(x, w, b).split(x.shape[-1], dim=-1)  # each (B, T, H)
        return self._heads(q), self._heads(k), self._heads(v)  # each (B, N, T, D)

    def _attention(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        B, T, H = x.shape
        q, k, v = self._qkv(x)
        dropout = self.attention_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)  # (B, N, T, D)
        return self.attention_out(a.transpose(1, 2).reshape(B, T, H))  # (B, T, H)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.ffn_out(F.gelu(self.ffn_in(x)))  # (B, T, H)


class BertForPretraining(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise UserError("model.config.vocab_size is not set")
        self.config = config
        H = config.hidden_size
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        # pre-LN: the last layer's output is a sum of unnormalised sublayer outputs; normalise it once
        self.final_norm = nn.LayerNorm(H, eps=config.layer_norm_eps) if config.norm_placement == "pre" else None
        self.pooler = nn.Linear(H, H) if config.sentence_head is not False else None
        self.mlm_dense = nn.Linear(H, H)
        self.mlm_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.nsp = nn.Linear(H, 2) if config.sentence_head is not False else None  # NSP's or SOP's 2-way head
        self.activation_checkpointing = False  # recompute each layer in backward: less memory at seq 512
        self.apply(self._init_weights)
        if config.position_init == "sinusoidal":
            with torch.no_grad():
                self.embeddings.position.weight.copy_(sinusoidal_positions(
                    config.max_position_embeddings, H, config.initializer_range))

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states (B, T, H); padded positions (attention_mask 0) are ignored as keys."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise UserError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        key_mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
        return x if self.final_norm is None else self.final_norm(x)

    def pool(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.pooler(hidden[:, 0]))  # (B, H)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits for hidden states of any leading shape (..., H) -> (..., V)."""
        h = self.mlm_norm(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.embeddings.word.weight, self.mlm_bias)  # decoder tied to word embeddings

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor,
        attention_mask: Tensor | None = None,
        predict: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns (MLM logits, sentence logits (B, 2), None without a sentence head).

        ``positions`` (B, P) long: the MLM head is evaluated at these positions of each
        sequence (Google's fixed prediction slots): logits (B, P, V), a shape that does not
        depend on the data. ``predict`` (B, T) bool instead selects positions by mask: logits
        (P, V) in row-major order (a data-dependent shape). Without either: (B, T, V).
        """
        hidden = self.encode(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        if positions is not None:
            index = positions[:, :, None].expand(-1, -1, hidden.shape[-1])  # (B, P, H)
            selected = hidden.gather(1, index)  # (B, P, H)
        else:
            selected = hidden if predict is None else hidden[predict]  # (B, T, H) or (P, H)
        return self.mlm_logits(selected), None if self.nsp is None else self.nsp(self.pool(hidden))

    def reset_pooler(self) -> None:
        """BERT's random initialisation for the pooler alone (its weights were trained for NSP), made
        anew for an encoder pretrained without a sentence head."""
        if self.pooler is None:
            H = self.config.hidden_size
            self.pooler = nn.Linear(H, H, device=self.embeddings.word.weight.device)
        self._init_weights(self.pooler)

    def reset_top_layers(self, count: int) -> None:
        """BERT's random initialisation for the top ``count`` encoder layers (0: none)."""
        for layer in self.layers[len(self.layers) - count:]:
            layer.apply(self._init_weights)

    @classmethod
    def randomly_initialised(cls, config: BertConfig, seed: int = 0) -> BertForPretraining:
        """BERT's random initialisation from a fixed seed: the baseline that shows what
        pretraining is worth (``bertpre finetune --model.random_init``, the probes). Drawn from a
        copy of the random state, so the caller's stream (a run's seed: its classifier head,
        dropout and data order) goes on as if this had not been called."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    def num_parameters(self, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not embeddings:
            total -= sum(p.numel() for p in self.embeddings.parameters())
        return total


def without_pretraining_heads(encoder: BertForPretraining) -> BertForPretraining:
    """Drop the MLM and NSP heads, unused in classification (DDP needs every parameter used)."""
    encoder.mlm_dense = encoder.mlm_norm = encoder.nsp = None
    encoder.mlm_bias = None
    return encoder


POOLINGS = ("cls", "mean")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise UserError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def mean_over_tokens(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The mean of each sequence's hidden states over its real tokens (padding left out)."""
    if attention_mask is None:
        return hidden.mean(1)  # (B, H)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, H)


class BertForSequenceClassification(nn.Module):
    """A pretrained encoder and a linear layer on a vector per sequence. ``pooling="cls"``: the
    pooled [CLS] vector, as transformers' ``BertForSequenceClassification`` (``encoder.*`` is its
    ``bert.*``; ``classifier`` is ``classifier``), so a fine-tuned model exports name for name.
    ``pooling="mean"``: the mean of the last hidden states over the real tokens, no pooler (its
    NSP-trained weights are dropped); no transformers class computes that, so it does not export."""

    def __init__(self, encoder: BertForPretraining, num_labels: int, classifier_dropout: float = 0.1,
                 pooling: str = "cls") -> None:
        super().__init__()
        if num_labels < 2:
            raise UserError(f"a classifier needs at least 2 labels, got {num_labels}")
        check_pooling(pooling)
        self.pooling = pooling
        self.encoder = without_pretraining_heads(encoder)
        if pooling == "mean":
            self.encoder.pooler = None  # unused (DDP needs every parameter used)
        elif self.encoder.pooler is None:  # pretrained without a sentence head (--objective none): a new pooler
            self.encoder.reset_pooler()
        self.config = encoder.config
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=encoder.config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    @property
    def embeddings(self) -> Embeddings:
        return self.encoder.embeddings

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        hidden = self.encoder.encode(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        if self.pooling == "mean":
            pooled = mean_over_tokens(hidden, attention_mask)  # (B, H)
        else:
            pooled = self.encoder.pool(hidden)  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, labels)

