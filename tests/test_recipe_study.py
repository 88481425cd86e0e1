"""The recipe study script runs its arms and writes its table, curves and figures."""

import json
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_recipe_study_runs_an_arm_end_to_end(sample_prepared, tmp_path):
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, str(ROOT / "studies" / "recipe_study.py"), "--data", str(sample_prepared),
                           "--arms", "pre-ln", "--minutes", "0.15", "--batch-size", "8", "--val-every", "10",
                           "--val-batches", "2", "--output", str(out), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results] == ["pre-ln"] and results[0]["steps"] > 10
    curve = results[0]["curve"]
    assert curve and all(-1 <= p["context_gain"] <= 1 and 0 <= p["mlm_accuracy"] <= 1 for p in curve)
    assert (out / "table.md").read_text().count("\n") == 3 and (out / "curves.png").stat().st_size > 10_000


def test_the_neighbour_baseline_counts_what_neighbours_tell(sample_prepared):
    """On real prose the two neighbours of a token predict it far better than its frequency; the
    unigram figure is the share of the most frequent train token among the sampled validation tokens."""
    from bertpre.data.prepared import PreparedData
    from bertpre.data.tokenizer import special_ids
    from studies.neighbour_baseline import neighbour_baseline

    r = neighbour_baseline(sample_prepared)
    prepared = PreparedData(sample_prepared)
    special = set(special_ids(prepared.tokenizer).all)
    splits = prepared.load_dataset()
    top = Counter(t for ids in splits["train"]["input_ids"] for t in ids if t not in special).most_common(1)[0][0]
    val = [t for ids in splits["validation"]["input_ids"] for t in ids if t not in special]
    share = val.count(top) / len(val)
    assert r["positions"] > 1000
    assert abs(r["unigram"] - share) < 4 * (share * (1 - share) / r["positions"]) ** 0.5, (r, share)
    assert r["left+right"] > r["left"] + 0.03 and r["left"] > 2 * r["unigram"], r


def test_each_arm_is_timed_to_googles_final_accuracy_on_its_own_data():
    """A study holding arms on two prepared folders times every arm to the final accuracy of
    Google's arm on the same folder, never on the other one."""
    from studies.recipe_study import table

    def arm(name, data, accuracies):
        curve = [{"step": 100 * (i + 1), "tokens": 1e6 * (i + 1), "minutes": 10.0 * (i + 1), "mlm_accuracy": a,
                  "context_gain": 0.0, "majority": 0.06} for i, a in enumerate(accuracies)]
        return {"arm": name, "what": name, "data": data, "max_seq_length": 64 if data.endswith("64") else 128,
                "steps": 100 * len(accuracies), "batch_size": 64, "curve": curve}

    rows = table([arm("recommended", "out/c-64", [0.12, 0.15, 0.2]), arm("google", "out/c", [0.1, 0.13, 0.16]),
                  arm("google", "out/c-64", [0.1, 0.11, 0.14]), arm("previous", "out/c", [0.14, 0.17, 0.18])])
    recommended, google, google64, previous = rows.splitlines()[2:]
    assert recommended.endswith("| 0.1400: 2.0M / 20.0 min |") and "out/c-64 (seq 64)" in recommended
    assert previous.endswith("| 0.1600: 2.0M / 20.0 min |") and "out/c (seq 128)" in previous
    assert google.endswith("| 0.1600: 3.0M / 30.0 min |") and google64.endswith("| 0.1400: 3.0M / 30.0 min |")


def test_validation_minutes_come_from_the_logs_wall_clock(tmp_path):
    """Each validation is placed at the wall-clock minute its TensorBoard entry was written,
    counted from the log's opening, keyed by the 1-based step like the curve."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from studies.recipe_study import validation_minutes

    assert validation_minutes(tmp_path) == {}
    writer = SummaryWriter(str(tmp_path))
    opened = time.time()
    writer.add_scalar("train/loss", 7.0, 49, walltime=opened + 30)
    writer.add_scalar("val/mlm_accuracy", 0.12, 199, walltime=opened + 150)
    writer.add_scalar("val/mlm_accuracy", 0.25, 399, walltime=opened + 330)
    writer.close()
    minutes = validation_minutes(tmp_path)
    assert sorted(minutes) == [200, 400]
    assert abs(minutes[200] - 2.5) < 0.05 and abs(minutes[400] - 5.5) < 0.05, minutes


@pytest.mark.slow
def test_the_objective_study_trains_each_objective_on_one_tokenizer(tmp_path):
    out, work = tmp_path / "study", tmp_path / "work"
    done = subprocess.run([sys.executable, "-m", "studies.objective_study", "--corpus",
                           str(ROOT / "data_prep" / "sample" / "carroll-alice.txt"),
                           str(ROOT / "data_prep" / "sample" / "shakespeare-caesar.txt"),
                           "--config", str(ROOT / "configs" / "bert-tiny.yaml"), "--vocab-size", "1000",
                           "--minutes", "0.1", "--val-every", "5", "--val-batches", "1", "--no-transfer",
                           "--output", str(out), "--work", str(work)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results] == ["nsp", "sop", "none"]
    assert [r["sentence_accuracy"] is None for r in results] == [False, False, True]
    vocabularies = {(work / "data" / f"{o}-64" / "vocab.txt").read_text() for o in ("nsp", "sop", "none")}
    assert len(vocabularies) == 1, "the three objectives must share one tokenizer"
    assert (out / "table.md").read_text().count("\n") == 5 and (out / "curves.png").is_file()


def test_the_qkv_study_baseline_computes_what_the_model_computes():
    """studies/qkv_fusion times the model against a copy whose layers project q, k and v with three
    products: the two must give the same outputs, or the study times two different functions."""
    import torch

    from bertpre.model.bert import BertConfig, BertForPretraining
    from studies.qkv_fusion import with_separate_projections

    torch.manual_seed(0)
    config = BertConfig.from_preset("bert-tiny", vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0)
    fused = BertForPretraining(config)
    separate = with_separate_projections(BertForPretraining(config))
    separate.load_state_dict(fused.state_dict())
    ids = torch.randint(5, 300, (2, 16))
    types_ = torch.zeros_like(ids)
    mlm_a, nsp_a = fused(ids, types_)
    mlm_b, nsp_b = separate(ids, types_)
    assert torch.allclose(mlm_a, mlm_b, atol=1e-5) and torch.allclose(nsp_a, nsp_b, atol=1e-5)
    assert all(layer._qkv.__func__.__name__ == "separate_projections" for layer in separate.layers)


def test_the_mlm_loss_study_swaps_only_the_loss_for_its_step():
    """studies/mlm_loss runs the same step with the loss's own backward and with F.cross_entropy:
    inside a step the pretraining loss calls the arm's function (the same value), and after it the
    product's loss is back."""
    import torch

    import bertpre.training.loss as loss_module
    from studies.mlm_loss import cross_entropy, with_mlm_loss

    calls, values = [], []
    logits = torch.randn(6, 20)
    targets = torch.tensor([3, -100, 7, 0, -100, 19])

    def step():
        calls.append(loss_module.masked_lm_cross_entropy)
        values.append(loss_module.pretraining_loss(logits, targets).mlm_loss)

    product = loss_module.masked_lm_cross_entropy
    with_mlm_loss(cross_entropy, step)()
    with_mlm_loss(product, step)()
    assert calls == [cross_entropy, product] and loss_module.masked_lm_cross_entropy is product
    assert torch.allclose(values[0], values[1], atol=1e-6)
