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
