"""How much does a pretrained checkpoint use context? MLM accuracy on validation pairs as
they are, and with every unmasked ordinary token replaced by a random one.

    python data_prep/mlm_context_probe.py CHECKPOINT PREPARED_DIR [--batches 50]

A model that has learned only which tokens are frequent scores about the same on both; the
gap is what it gets from context (what fine-tuning can build on). Also printed: the accuracy
of always predicting the most frequent masked token.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bertpre.data import ContentSeededCollator
from bertpre.masking import IGNORE_INDEX, Masker, default_max_predictions
from bertpre.model import BertConfig, BertForPretraining
from bertpre.module import CHECKPOINT_KEY, read_checkpoint
from bertpre.prepared import PreparedData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("prepared")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    checkpoint = read_checkpoint(args.checkpoint)
    model = BertForPretraining(BertConfig(**checkpoint[CHECKPOINT_KEY]["model_config"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()
                           if k.startswith("model.")})
    model.eval()
    prepared = PreparedData(args.prepared)
    masker = Masker.from_tokenizer(prepared.tokenizer, default_max_predictions(prepared.max_seq_length))
    collate = ContentSeededCollator(masker, pad_to_multiple_of=8)
    rows = prepared.load_dataset()["validation"].with_format("numpy")
    rng = np.random.default_rng(0)
    correct = {"context": 0, "random context": 0}
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
        counts += np.bincount(targets.numpy(), minlength=prepared.vocab_size)[: prepared.vocab_size]
        total += len(targets)
    for name, right in correct.items():
        print(f"MLM accuracy, {name:<15} {right / total:.4f}")
    print(f"most frequent token        {counts.max() / total:.4f}   ({total} masked tokens)")


if __name__ == "__main__":
    main()
