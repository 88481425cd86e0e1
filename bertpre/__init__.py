"""bertpre: pretrain BERT-style encoders from scratch with masked-LM and next-sentence prediction."""

__version__ = "0.1.0"
