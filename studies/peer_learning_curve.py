"""Does bertpre's model learn as fast as transformers' BertForPreTraining? Both start from the
same weights and train on the same batches of a prepared folder (same masks) with the same
loss, AdamW groups, warmup / linear-decay schedule, gradient clipping and precision, in one
plain training loop; printed: the mean MLM loss over each window of steps.

    python studies/peer_learning_curve.py PREPARED_DIR [--steps 1000] [--batch-size 32]
        [--learning-rate 1e-3] [--warmup-steps 240] [--schedule-steps 6000] [--dropout 0]
        [--precision bf16] [--preset bert-mini] [--window 100]

The defaults are the first 1,000 steps of the README's run C, so that the figures can also be
set beside that run's Lightning log (train/mlm_loss in its metrics.csv).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bertpre.data.datamodule import ContentSeededCollator
from bertpre.data.masking import IGNORE_INDEX, Masker, default_max_predictions
from bertpre.data.prepared import PreparedData
from bertpre.errors import UserError
from bertpre.model.bert import BertConfig, BertForPretraining
from bertpre.model.hf import to_transformers
from bertpre.training.loss import pretraining_loss
from bertpre.training.optim import build_optimizer

FRAMEWORKS = ("bertpre", "transformers")


def build_model(framework: str, config: BertConfig, pad_id: int) -> torch.nn.Module:
    torch.manual_seed(0)
    ours = BertForPretraining(config)
    return ours if framework == "bertpre" else to_transformers(ours, pad_id, attn_implementation="sdpa")


def mlm_losses(framework: str, model: torch.nn.Module, batches, args) -> list[float]:
    optimizer, scheduler = build_optimizer(model, "adamw", args.learning_rate, 0.01, (0.9, 0.999), 1e-6,
                                           args.warmup_steps, args.schedule_steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    model.train()
    losses = []
    for batch in batches:
        predict = batch["labels"] != IGNORE_INDEX
        targets = batch["labels"][predict]
        with autocast:
            if framework == "bertpre":
                mlm, nsp = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], predict=predict)
            else:
                out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                            attention_mask=batch["attention_mask"])
                mlm, nsp = out.prediction_logits[predict], out.seq_relationship_logits
            loss = pretraining_loss(mlm, targets, nsp, batch["next_sentence_label"])
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.mlm_loss.detach()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prepared")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=240)
    parser.add_argument("--schedule-steps", type=int, default=6000, help="steps over which the rate decays to 0")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", choices=("32", "bf16"), default="bf16")
    parser.add_argument("--preset", default="bert-mini")
    parser.add_argument("--window", type=int, default=100)
    args = parser.parse_args()
    prepared = PreparedData(args.prepared)
    rows = prepared.load_dataset()["train"].with_format("numpy")
    if len(rows) < args.steps * args.batch_size:
        raise UserError(f"{args.prepared}: {len(rows)} training pairs, fewer than --steps x --batch-size")
    masker = Masker.from_tokenizer(prepared.tokenizer, default_max_predictions(prepared.max_seq_length))
    collate = ContentSeededCollator(masker)
    order = np.random.default_rng(0).permutation(len(rows))[: args.steps * args.batch_size]
    batches = [collate([rows[int(i)] for i in order[s : s + args.batch_size]])
               for s in range(0, len(order), args.batch_size)]
    config = BertConfig.from_preset(args.preset, vocab_size=prepared.vocab_size, hidden_dropout=args.dropout,
                                    attention_dropout=args.dropout)
    curves = {}
    for framework in FRAMEWORKS:
        start = time.perf_counter()
        model = build_model(framework, config, masker.special.pad)
        curves[framework] = np.array(mlm_losses(framework, model, batches, args))
        print(f"{framework}: {args.steps} steps in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"{'steps':>11}  " + "  ".join(f"{f:>12}" for f in FRAMEWORKS) + "   (mean MLM loss)")
    for start in range(0, args.steps, args.window):
        window = slice(start, start + args.window)
        print(f"{start + 1:>5}-{min(start + args.window, args.steps):<5}  "
              + "  ".join(f"{curves[f][window].mean():>12.3f}" for f in FRAMEWORKS))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
