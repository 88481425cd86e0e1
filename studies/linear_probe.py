"""Do an encoder's frozen features carry a task's labels? A linear probe: logistic regression
on frozen features of a training subset, accuracy on the validation file.

    python studies/linear_probe.py CHECKPOINT TRAIN_FILE VALIDATION_FILE [--train-examples 2000]
        [--random-init] [--text-column sentence content] [--label-column label]

CHECKPOINT is a bertpre .ckpt or an exported directory. Features, each probed on its own:
the [CLS] hidden state, the pooled output, the mean of the final hidden states, and the
mean of the input word embeddings. ``--random-init`` probes the same architecture at
BERT's random initialisation (the baseline). The L2 strength is chosen per feature from
three values on the validation file, the same way for every encoder, so the figures compare
encoders and are not unbiased estimates.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bertpre.errors import UserError
from bertpre.model.bert import BertForPretraining
from bertpre.model.checkpoint import load_pretrained
from bertpre.tasks.table import collate, encode_rows, pick_column, read_table, sample_rows

L2_STRENGTHS = (0.01, 0.1, 1.0)  # inverse regularisation C, as in the usual logistic regression


@torch.no_grad()
def features(model: BertForPretraining, encoded: list, pad_id: int, batch_size: int = 128) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"cls": [], "pooled": [], "mean hidden": [], "mean embedding": []}
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_id)
        hidden = model.encode(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # (B, T, H)
        mask = batch["attention_mask"][..., None].float()  # (B, T, 1)
        embedded = model.embeddings.word(batch["input_ids"])  # (B, T, H)
        out["cls"].append(hidden[:, 0])
        out["pooled"].append(model.pool(hidden))
        out["mean hidden"].append((hidden * mask).sum(1) / mask.sum(1))
        out["mean embedding"].append((embedded * mask).sum(1) / mask.sum(1))
    return {name: torch.cat(parts) for name, parts in out.items()}


def logistic_regression_accuracy(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                                 c: float) -> float:
    """Multinomial logistic regression with an L2 penalty |w|^2 / (2 C n), fitted by L-BFGS."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_val = (x - mean) / std, (x_val - mean) / std
    classes = int(max(y.max(), y_val.max())) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + (weight**2).sum() / (2 * c * len(y))
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((x_val @ weight + bias).argmax(-1) == y_val).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("train_file")
    parser.add_argument("validation_file")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--text-column", nargs="+", default=["sentence", "content"])
    parser.add_argument("--label-column", default="label")
    args = parser.parse_args()
    model, tokenizer = load_pretrained(args.checkpoint)
    if args.random_init:
        model = BertForPretraining.randomly_initialised(model.config).eval()
    columns = {"text_column": args.text_column, "text_pair_column": None, "label_column": args.label_column,
               "max_seq_length": 128}
    train_rows = sample_rows(read_table(args.train_file), args.train_examples, args.subset_seed)
    label_column = pick_column(train_rows, args.label_column, args.train_file, "--label-column")
    labels = sorted({row[label_column] for row in train_rows})
    train = encode_rows(train_rows, args.train_file, tokenizer, columns, labels)
    validation = encode_rows(read_table(args.validation_file), args.validation_file, tokenizer, columns, labels)
    pad_id = tokenizer.token_to_id("[PAD]")
    x, x_val = features(model, train, pad_id), features(model, validation, pad_id)
    y = torch.tensor([label for _, _, label in train])
    y_val = torch.tensor([label for _, _, label in validation])
    encoder = "random init" if args.random_init else args.checkpoint
    for name in x:
        accuracy, c = max((logistic_regression_accuracy(x[name], y, x_val[name], y_val, c), c) for c in L2_STRENGTHS)
        print(f"{encoder}  {len(train)} examples  {name:<15} validation accuracy {accuracy:.3f} (C={c})")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
