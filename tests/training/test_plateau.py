"""The MLM plateau metric: accuracy with real context minus accuracy with random context."""

import pytest
import torch
from torch import nn

from bertpre.data.masking import IGNORE_INDEX, prediction_slots
from bertpre.model.bert import BertConfig
from bertpre.training.plateau import ordinary_ids, random_context
from bertpre.training.pretraining import PretrainModule

V, SPECIAL = 50, [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]


def doubled_batch(batch_size: int = 64, pairs: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] a a b b c c ... [SEP] [PAD] [PAD]: every second token repeats its left neighbour, and the
    repeats are masked ([MASK] in the input, the token as label). Context (the left neighbour) gives
    each masked token away; without it only the token frequencies are left (uniform here)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(5, V, (batch_size, pairs), generator=g)
    body = words.repeat_interleave(2, dim=1)  # (B, 2 * pairs)
    labels = torch.full_like(body, IGNORE_INDEX)
    labels[:, 1::2] = body[:, 1::2]
    body = body.clone()
    body[:, 1::2] = 4
    ids = torch.cat([torch.full((batch_size, 1), 2), body, torch.full((batch_size, 1), 3),
                     torch.zeros(batch_size, 2, dtype=torch.long)], dim=1)
    labels = torch.cat([torch.full((batch_size, 1), IGNORE_INDEX), labels,
                        torch.full((batch_size, 3), IGNORE_INDEX)], dim=1)
    mask = (ids != 0).long()
    positions, slot_labels = prediction_slots(labels.numpy(), pairs + 2)  # two empty slots per row
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "next_sentence_label": torch.zeros(batch_size, dtype=torch.long),
            "mlm_positions": torch.from_numpy(positions), "mlm_labels": torch.from_numpy(slot_labels)}


class CopyLeft(nn.Module):
    """Predicts the token left of each predicted position: a model that uses context."""

    def forward(self, ids, types, mask, positions):
        left = torch.roll(ids, 1, dims=1).gather(1, positions)  # (B, P)
        return torch.nn.functional.one_hot(left, V).float(), torch.zeros(len(ids), 2)


class Unigram(nn.Module):
    """Always the same distribution, whatever the input: a model on the plateau."""

    def forward(self, ids, types, mask, positions):
        logits = torch.zeros(*positions.shape, V)  # (B, P, V)
        logits[..., 7] = 1.0
        return logits, torch.zeros(len(ids), 2)


def measured(model: nn.Module) -> tuple[float, float]:
    module = PretrainModule(BertConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16))
    module.model = model
    module.special_ids = torch.tensor(SPECIAL)
    module.ordinary_ids = ordinary_ids(V, SPECIAL)
    for i in range(3):
        module._context_gain_update(doubled_batch(seed=i), i)
    counts = {name: float(metric.compute()) for name, metric in module.context_counts.items()}
    return counts["real"] / counts["predicted"], counts["random"] / counts["predicted"]


def test_a_model_that_uses_context_gains_and_one_that_does_not_gains_nothing():
    real, random = measured(CopyLeft())
    assert real == 1.0 and random < 0.1, (real, random)  # random context: the copy is right 1 time in 45
    real, random = measured(Unigram())
    assert real == random


def test_random_context_keeps_predicted_special_and_padded_positions():
    batch = doubled_batch()
    special = torch.tensor(SPECIAL)
    shuffled = random_context(batch["input_ids"], batch["labels"], batch["attention_mask"], ordinary_ids(V, SPECIAL),
                              special, torch.Generator().manual_seed(0))
    kept = (batch["labels"] != IGNORE_INDEX) | torch.isin(batch["input_ids"], special)
    assert torch.equal(shuffled[kept], batch["input_ids"][kept])
    replaced = shuffled[~kept]
    assert not torch.isin(replaced, special).any()
    assert (replaced != batch["input_ids"][~kept]).float().mean() > 0.9  # 1 in 45 draws the same id
    counts = torch.bincount(replaced, minlength=V)[5:].float()  # uniform over the 45 ordinary ids
    expected = len(replaced) / 45
    assert ((counts - expected) ** 2 / expected).sum() < 80  # chi-square, 44 dof: p < 0.001 above 80


@pytest.mark.slow  # 20-50 s on this 2-core machine; in CI's slow run
def test_training_logs_the_context_gain_and_warns_once_on_the_plateau(sample_prepared, tmp_path, capsys):
    from conftest import ROOT

    from bertpre.cli import main

    run = tmp_path / "run"
    main(["train", "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--data.path", str(sample_prepared),
          "--trainer.default_root_dir", str(run), "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
          "--trainer.limit_val_batches", "3", "--trainer.enable_progress_bar", "false",
          "--model.context_gain_batches", "2", "--model.plateau_check_fraction", "0.4",
          "--model.plateau_min_gain", "1.0"])  # a gain of 1.0 is out of reach: the warning must come
    captured = capsys.readouterr()
    summary = [line for line in captured.out.splitlines() if "val/mlm_context_gain" in line]
    assert len(summary) == 1 and "val/mlm_random_context_accuracy" in summary[0]
    warnings = [line for line in captured.err.splitlines() if "the MLM plateau" in line]
    assert len(warnings) == 1 and warnings[0].startswith("bertpre: warning: step 10 (50% of the run): "
                                                         "val/mlm_context_gain ")
    import csv

    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    gains = [float(r["val/mlm_context_gain"]) for r in rows if r.get("val/mlm_context_gain")]
    assert len(gains) == 2 and all(-1.0 <= g <= 1.0 for g in gains)
