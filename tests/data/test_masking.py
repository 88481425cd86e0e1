import numpy as np
import pytest
import torch

from bertpre.data.masking import IGNORE_INDEX, Masker, MaskingCollator, default_max_predictions
from bertpre.data.prepared import PreparedData
from bertpre.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def real_examples(gutenberg_prepared):
    train = PreparedData(gutenberg_prepared).load_dataset()["train"].with_format("numpy")
    return [train[i] for i in range(0, min(len(train), 8000), 2)]


def masked_batches(examples, tokenizer, whole_word=False, batch_size=32, seed=0):
    masker = Masker.from_tokenizer(tokenizer, default_max_predictions(128), whole_word=whole_word)
    collate = MaskingCollator(masker)
    torch.manual_seed(seed)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        originals = np.zeros((len(chunk), max(len(e["input_ids"]) for e in chunk)), dtype=np.int64)
        for row, e in enumerate(chunk):
            originals[row, : len(e["input_ids"])] = e["input_ids"]
        yield masker, originals, collate(chunk)


def test_masking_rates_on_real_data(gutenberg_prepared, real_examples):
    tokenizer = load_tokenizer(gutenberg_prepared)
    special = {tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    mask_id = tokenizer.token_to_id("[MASK]")
    predicted = eligible = masked = randomised = kept = 0
    for masker, originals, batch in masked_batches(real_examples, tokenizer):
        labels, ids, attention = batch["labels"].numpy(), batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        chosen = labels != IGNORE_INDEX
        is_special = np.isin(originals, list(special)) | (attention == 0)
        assert not (chosen & is_special).any(), "[CLS]/[SEP]/[PAD] are never predicted"
        assert (ids[is_special] == originals[is_special]).all(), "specials are never changed"
        assert (ids[~chosen] == originals[~chosen]).all(), "only chosen positions change"
        assert (labels[chosen] == originals[chosen]).all(), "labels are the original tokens"
        assert (chosen.sum(1) <= masker.max_predictions).all()
        predicted += chosen.sum()
        eligible += (~is_special).sum()
        masked += (ids[chosen] == mask_id).sum()
        unchanged = ids[chosen] == originals[chosen]
        kept += unchanged.sum()
        randomised += ((ids[chosen] != mask_id) & ~unchanged).sum()
    assert abs(predicted / eligible - 0.15) <= 0.01
    assert abs(masked / predicted - 0.8) <= 0.02
    # a random replacement can draw the original token (p = 1/V): it then counts as kept
    assert abs(randomised / predicted - 0.1) <= 0.02
    assert abs(kept / predicted - 0.1) <= 0.02


def test_whole_word_masking_keeps_words_whole(gutenberg_prepared, real_examples):
    tokenizer = load_tokenizer(gutenberg_prepared)
    vocab = tokenizer.get_vocab()
    continuation = np.zeros(len(vocab), dtype=bool)
    continuation[[i for t, i in vocab.items() if t.startswith("##")]] = True
    split_words = predicted = eligible = 0
    for _, originals, batch in masked_batches(real_examples[:1500], tokenizer, whole_word=True):
        chosen = (batch["labels"] != IGNORE_INDEX).numpy()
        special = np.isin(originals, [tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")])
        after_special = np.pad(special[:, :-1], ((0, 0), (1, 0)), constant_values=True)
        starts = ~continuation[originals] | after_special  # a cut-off word may begin with a ## piece
        for row in range(len(originals)):
            word = np.cumsum(starts[row])  # piece -> word index
            for w in np.unique(word[chosen[row]]):
                pieces = chosen[row][word == w]
                split_words += not pieces.all()
        predicted += chosen.sum()
        eligible += batch["attention_mask"].sum().item() - 3 * len(originals)
    assert split_words == 0
    assert abs(predicted / eligible - 0.15) <= 0.015


def test_batches_have_huggingface_keys_and_padding(sample_prepared):
    tokenizer = load_tokenizer(sample_prepared)
    masker = Masker.from_tokenizer(tokenizer, 10)
    examples = [
        {"input_ids": np.array([2, 10, 11, 12, 3, 13, 3]), "token_type_ids": np.array([0, 0, 0, 0, 0, 1, 1]),
         "next_sentence_label": 1},
        {"input_ids": np.array([2, 14, 3, 15, 3]), "token_type_ids": np.array([0, 0, 0, 1, 1]),
         "next_sentence_label": 0},
    ]
    batch = MaskingCollator(masker, pad_to_multiple_of=8)(examples)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label",
                          "mlm_positions", "mlm_labels"}  # HuggingFace's keys + Google's fixed prediction slots
    assert batch["mlm_positions"].shape == batch["mlm_labels"].shape == (2, 10)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 5 + [0] * 3]
    assert batch["input_ids"][1, 5:].tolist() == [0, 0, 0]
    assert batch["next_sentence_label"].tolist() == [1, 0]
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) >= 1).all()


def test_stored_masks_are_used_as_they_are(sample_prepared):
    masker = Masker.from_tokenizer(load_tokenizer(sample_prepared), 10)
    example = {"input_ids": np.array([2, 4, 11, 3, 4, 3]), "token_type_ids": np.array([0, 0, 0, 0, 1, 1]),
               "next_sentence_label": 0, "masked_lm_positions": np.array([1, 4]), "masked_lm_ids": np.array([50, 60])}
    batch = MaskingCollator(masker)([example])
    assert batch["input_ids"][0].tolist() == [2, 4, 11, 3, 4, 3]
    assert batch["labels"][0].tolist() == [-100, 50, -100, -100, 60, -100]


@pytest.mark.parametrize("rate", [0.3, 0.4])
def test_a_higher_masking_rate_is_not_capped_back_to_bert_s(gutenberg_prepared, real_examples, rate):
    """The default cap on predictions per sequence scales with the rate: at 0.4 the share
    predicted is 0.4, not Google's cap of 20 in 128 (15.6%)."""
    tokenizer = load_tokenizer(gutenberg_prepared)
    masker = Masker.from_tokenizer(tokenizer, default_max_predictions(128, rate), mlm_probability=rate)
    collate = MaskingCollator(masker)
    predicted = eligible = 0
    for start in range(0, 2000, 50):
        batch = collate(real_examples[start : start + 50])
        predicted += (batch["labels"] != IGNORE_INDEX).sum().item()
        eligible += batch["attention_mask"].sum().item()  # the rate applies to the length with [CLS] and [SEP]
    assert abs(predicted / eligible - rate) <= 0.01
    assert default_max_predictions(128) == 20 and default_max_predictions(512) == 80  # Google's at 0.15


def test_validation_masks_at_berts_rate_whatever_the_training_rate(sample_prepared):
    from bertpre.data.datamodule import PretrainDataModule

    data = PretrainDataModule(str(sample_prepared), batch_size=8, mlm_probability=0.4)
    data.setup("fit")
    assert data.masker.mlm_probability == 0.4 and data.val_masker.mlm_probability == 0.15
    same = PretrainDataModule(str(sample_prepared), batch_size=8, mlm_probability=0.4, val_mlm_probability=None)
    same.setup("fit")
    assert same.val_masker.mlm_probability == 0.4


def masked_runs(predicted: np.ndarray) -> np.ndarray:
    """Lengths of the runs of consecutive predicted positions in one row."""
    edges = np.diff(np.concatenate([[0], predicted.astype(np.int8), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_ngram_span_lengths_follow_the_weights():
    """Spans of n = 1..4 units are started with weights 4:3:2:1 (MacBERT's 40/30/20/10%). A long
    sequence and a small budget keep spans apart, so each masked run is one span."""
    masker = Masker(special=None, random_pool=np.arange(5), max_predictions=30, max_ngram=4)
    candidates = np.arange(1, 3001)  # 3,000 one-token units, all adjacent
    starts, lengths = np.arange(3000), np.ones(3000, dtype=np.int64)
    rng = np.random.default_rng(0)
    counts = np.zeros(5)
    for _ in range(400):
        taken = masker._ngram_groups(candidates, starts, lengths, 30, rng)
        assert taken.sum() == 30, "the budget is filled exactly: the last span is cut to fit"
        runs = masked_runs(taken)
        counts += np.bincount(np.minimum(runs, 4), minlength=5)
    shares = counts[1:] / counts[1:].sum()
    # the span cut at the budget and the rare touching spans shift a little weight: 0.03 tolerance
    assert np.allclose(shares, [0.4, 0.3, 0.2, 0.1], atol=0.03), shares


def test_ngram_masking_on_real_text_keeps_the_rate_and_masks_longer_runs(gutenberg_prepared, real_examples):
    tokenizer = load_tokenizer(gutenberg_prepared)
    special = [tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
    mask_id = tokenizer.token_to_id("[MASK]")
    mean_run = {}
    for max_ngram in (1, 3):
        masker = Masker.from_tokenizer(tokenizer, default_max_predictions(128), max_ngram=max_ngram)
        collate = MaskingCollator(masker)
        runs, masked, predicted = [], 0, 0
        for start in range(0, 2000, 50):
            chunk = real_examples[start : start + 50]
            batch = collate(chunk)
            labels, ids = batch["labels"].numpy(), batch["input_ids"].numpy()
            for row, example in enumerate(chunk):
                chosen = labels[row, : len(example["input_ids"])] != IGNORE_INDEX
                assert chosen.sum() == masker.num_to_predict(len(example["input_ids"])), "the budget, exactly"
                assert not np.isin(example["input_ids"][chosen], special).any(), "[CLS]/[SEP] never predicted"
                runs.extend(masked_runs(chosen))
            predicted += (labels != IGNORE_INDEX).sum()
            masked += (ids[labels != IGNORE_INDEX] == mask_id).sum()
        assert abs(masked / predicted - 0.8) <= 0.02, "each token still gets its own 80/10/10 draw"
        mean_run[max_ngram] = np.mean(runs)
    # single tokens touch by chance (about 1.1); spans of 1-3 drawn 3:2:1 average 1.67 before touching
    assert mean_run[1] < 1.25 and mean_run[3] > 1.55, mean_run


def test_max_ngram_is_checked_and_validation_keeps_single_units(sample_prepared):
    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.errors import UserError

    with pytest.raises(UserError, match="max_ngram must be between 1 and 8, got 0"):
        Masker.from_tokenizer(load_tokenizer(sample_prepared), 10, max_ngram=0)
    data = PretrainDataModule(str(sample_prepared), batch_size=8, max_ngram=3)
    data.setup("fit")
    assert data.masker.max_ngram == 3 and data.val_masker.max_ngram == 1
    same = PretrainDataModule(str(sample_prepared), batch_size=8, max_ngram=3, val_max_ngram=None)
    same.setup("fit")
    assert same.val_masker.max_ngram == 3
