"""bertpre: pretrain BERT-style encoders from scratch with masked-LM and next-sentence prediction."""

__version__ = "0.1.0"


def load_pretrained(path, dropout=None):
    """The pretrained model and its tokenizer from a bertpre checkpoint or an exported directory;
    ``dropout`` replaces its dropout rates for further training (see
    bertpre.model.checkpoint.load_pretrained); Lightning is not imported."""
    from bertpre.model.checkpoint import load_pretrained as load

    return load(path, dropout)
