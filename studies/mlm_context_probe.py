"""How much does a pretrained checkpoint use context? MLM accuracy on validation pairs as
they are, and with every unmasked ordinary token replaced by a random one.

    python studies/mlm_context_probe.py CHECKPOINT PREPARED_DIR [--batches 50] [--random-init]
        [--whole-word-masking] [--neighbours WORD ...]

A model that has learned only which tokens are frequent scores about the same on both; the
gap is what it gets from context (what fine-tuning can build on). Also printed: the accuracy
of always predicting the most frequent masked token; the perplexity of the masked tokens'
own unigram distribution (the best a model that ignores context can do); the geometry of
the word embeddings (early in training they line up along word frequency); and, with
``--neighbours``, the nearest neighbours of some words. CHECKPOINT is a bertpre .ckpt or an
exported directory, trained with PREPARED_DIR's tokenizer.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from bertpre.data.datamodule import ContentSeededCollator
from bertpre.data.masking import IGNORE_INDEX, Masker, default_max_predictions
from bertpre.data.prepared import PreparedData
from bertpre.errors import UserError
from bertpre.model.bert import BertForPretraining
from bertpre.model.checkpoint import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prepared")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--random-init", action="store_true",
                        help="the checkpoint's architecture at BERT's random initialisation (the baseline)")
    parser.add_argument("--whole-word-masking", action="store_true",
                        help="mask whole words (a Chinese word as PREPARED_DIR's segmenter stored it) instead of tokens")
    parser.add_argument("--neighbours", nargs="*", default=[], metavar="WORD",
                        help="also print these words' nearest neighbours in the word-embedding space")
    args = parser.parse_args()
    model, tokenizer = load_pretrained(args.checkpoint)
    prepared = PreparedData(args.prepared)
    if tokenizer.get_vocab() != prepared.tokenizer.get_vocab():
        raise UserError(f"{args.checkpoint} was trained with another vocabulary than {args.prepared}'s tokenizer")
    if args.random_init:
        model = BertForPretraining.randomly_initialised(model.config).eval()
    masker = Masker.from_tokenizer(prepared.tokenizer, default_max_predictions(prepared.max_seq_length),
                                   whole_word=args.whole_word_masking)
    collate = ContentSeededCollator(masker, pad_to_multiple_of=8)
    splits = prepared.load_dataset()
    rows = splits["validation"].with_format("numpy")
    rng = np.random.default_rng(0)
    correct = {"context": 0, "random context": 0}
    nll = {"context": 0.0, "random context": 0.0}
    counts = np.zeros(prepared.vocab_size, dtype=np.int64)
    total = 0
    for b in range(args.batches):
        start = b * args.batch_size
        if start >= len(rows):
            break
        batch = collate([rows[i] for i in range(start, min(start + args.batch_size, len(rows)))])
        labels = batch["labels"]
        predict = labels != IGNORE_INDEX
        ordinary = ~torch.isin(batch["input_ids"], torch.tensor(masker.special.all)) & ~predict
        scrambled = batch["input_ids"].clone()
        scrambled[ordinary] = torch.from_numpy(rng.choice(masker.random_pool, int(ordinary.sum())))
        targets = labels[predict]
        for name, ids in (("context", batch["input_ids"]), ("random context", scrambled)):
            with torch.no_grad():
                logits, _ = model(ids, batch["token_type_ids"], batch["attention_mask"], predict=predict)
            correct[name] += int((logits.argmax(-1) == targets).sum())
            nll[name] += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        counts += np.bincount(targets.numpy(), minlength=prepared.vocab_size)[: prepared.vocab_size]
        total += len(targets)
    for name, right in correct.items():
        print(f"MLM accuracy, {name:<15} {right / total:.4f}   perplexity {np.exp(nll[name] / total):.1f}")
    frequency = counts[counts > 0] / total
    unigram_perplexity = np.exp(-(frequency * np.log(frequency)).sum())
    print(f"most frequent token        {counts.max() / total:.4f}   ({total} masked tokens)")
    print(f"unigram perplexity         {unigram_perplexity:.1f}   (the masked tokens' own frequencies: "
          "a model that knows only which tokens are common)")
    print_embedding_geometry(model, splits["train"], prepared.vocab_size, masker)
    print_neighbours(model, prepared, args.neighbours)


def print_embedding_geometry(model: BertForPretraining, train, vocab_size: int, masker: Masker,
                             rows: int = 20_000, pairs: int = 20_000) -> None:
    """How alike the word embeddings are (mean cosine of random pairs of ordinary tokens: 0 at
    random initialisation), the share of their variance along the first principal direction,
    and how that direction correlates with the tokens' log frequency in (a sample of) ``train``."""
    sample = train.select(range(0, len(train), max(1, len(train) // rows))).with_format("numpy")["input_ids"]
    counts = np.bincount(np.concatenate(list(sample)), minlength=vocab_size)[:vocab_size]
    ordinary = torch.from_numpy(masker.random_pool)
    embeddings = model.embeddings.word.weight.detach().float()[ordinary]  # (V', H)
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, len(ordinary), (pairs,), generator=generator) for _ in range(2))
    mean_cosine = float((unit[a] * unit[b]).sum(1).mean())
    centred = embeddings - embeddings.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    share = float(s[0] ** 2 / (s**2).sum())
    correlation = np.corrcoef(u[:, 0].numpy(), np.log1p(counts[masker.random_pool]))[0, 1]
    print(f"word embeddings            mean cosine {mean_cosine:+.3f}   first principal direction: "
          f"{share:.1%} of the variance, correlation with log frequency {correlation:+.2f}")


def print_neighbours(model: BertForPretraining, prepared: PreparedData, words: list[str], count: int = 6) -> None:
    embeddings = model.embeddings.word.weight.detach().float()
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    vocabulary = {i: token for token, i in prepared.tokenizer.get_vocab().items()}
    for word in words:
        index = prepared.tokenizer.token_to_id(word)
        if index is None:
            print(f"neighbours of {word!r}: not a single token of the vocabulary")
            continue
        nearest = (unit @ unit[index]).topk(count + 1).indices.tolist()
        print(f"neighbours of {word!r}: " + ", ".join(repr(vocabulary[i]) for i in nearest if i != index))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
