import random

import numpy as np
import pytest

from bertpre.data.pairs import PairOptions, create_instances, encode_instance, truncate_pair
from bertpre.errors import UserError


def make_documents(sentence_lengths: list[list[int]]) -> list[list[np.ndarray]]:
    """Documents whose token ids are unique and increasing, so spans can be traced back."""
    documents, next_id = [], 1000
    for lengths in sentence_lengths:
        document = []
        for n in lengths:
            document.append(np.arange(next_id, next_id + n, dtype=np.int32))
            next_id += n
        documents.append(document)
    return documents


def google_truncate(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """Google's loop, lengths only: cut the longer side (B when equal) one token at a time."""
    while len_a + len_b > max_tokens:
        if len_a > len_b:
            len_a -= 1
        else:
            len_b -= 1
    return len_a, len_b


@pytest.mark.parametrize("len_a,len_b,max_tokens", [(5, 5, 125), (200, 3, 125), (3, 200, 125), (100, 100, 125),
                                                    (64, 63, 125), (63, 64, 125), (1, 1, 1), (500, 500, 5)])
def test_truncate_pair_keeps_googles_lengths(len_a, len_b, max_tokens):
    keep_a, keep_b = truncate_pair(len_a, len_b, max_tokens, random.Random(0))
    kept = (keep_a.stop - keep_a.start, keep_b.stop - keep_b.start)
    assert kept == google_truncate(len_a, len_b, max_tokens)
    assert 0 <= keep_a.start <= keep_a.stop <= len_a and 0 <= keep_b.start <= keep_b.stop <= len_b


def test_truncate_pair_cuts_front_and_back_equally_often():
    rng = random.Random(1)
    fronts = [truncate_pair(300, 10, 110, rng)[0].start for _ in range(2000)]
    # 200 cuts from A, each at the front with probability 1/2
    assert abs(np.mean(fronts) - 100) < 1.5


def check_instance(instance, options: PairOptions):
    total = len(instance.tokens_a) + len(instance.tokens_b)
    assert len(instance.tokens_a) >= 1 and len(instance.tokens_b) >= 1
    assert total <= options.max_num_tokens


def test_one_sentence_documents_are_always_not_next_from_another_document():
    documents = make_documents([[12]] * 20)
    options = PairOptions(max_seq_length=64)
    instances = list(create_instances(documents, options, random.Random(3)))
    assert len(instances) == 20
    for index, instance in enumerate(instances):
        check_instance(instance, options)
        assert instance.is_random_next
        own = documents[index][0]
        assert not np.isin(instance.tokens_b, own).any(), "B must come from another document"


def test_single_document_corpus_draws_not_next_from_itself():
    documents = make_documents([[10] * 60])
    options = PairOptions(max_seq_length=64)
    instances = list(create_instances(documents, options, random.Random(5)))
    assert instances
    all_ids = np.concatenate(documents[0])
    for instance in instances:
        check_instance(instance, options)
        assert np.isin(instance.tokens_b, all_ids).all()
    labels = [i.is_random_next for i in instances]
    assert any(labels) and not all(labels)


def test_sentences_longer_than_max_length_are_truncated():
    documents = make_documents([[300, 250, 400], [500], [90, 90]])
    options = PairOptions(max_seq_length=128)
    instances = list(create_instances(documents, options, random.Random(7)))
    assert instances
    for instance in instances:
        check_instance(instance, options)
    assert all(instance.truncated for instance in instances[:2])


def test_is_next_pairs_are_contiguous_spans_of_their_document():
    documents = make_documents([[7, 9, 5, 11, 6, 8, 10, 4, 9, 12] * 4 for _ in range(6)])
    options = PairOptions(max_seq_length=256, short_seq_prob=0.0)
    instances = list(create_instances(documents, options, random.Random(11)))
    is_next = [i for i in instances if not i.is_random_next and not i.truncated]
    assert len(is_next) >= 5
    for instance in is_next:
        joined = np.concatenate([instance.tokens_a, instance.tokens_b])
        assert np.array_equal(joined, np.arange(joined[0], joined[0] + len(joined))), "A then B, no gap"


def test_not_next_puts_unused_sentences_back():
    # Every sentence of every document must end up in some A segment or IsNext B segment.
    # 6-token sentences and a 36-token budget: chunks hit the target exactly, nothing is truncated.
    documents = make_documents([[6] * 30 for _ in range(8)])
    options = PairOptions(max_seq_length=39, short_seq_prob=0.0)
    instances = list(create_instances(documents, options, random.Random(2)))
    assert not any(i.truncated for i in instances)
    assert any(i.is_random_next for i in instances)
    used = set()
    for instance in instances:
        used.update(instance.tokens_a.tolist())
        if not instance.is_random_next:
            used.update(instance.tokens_b.tolist())
    every = set(np.concatenate([s for d in documents for s in d]).tolist())
    assert every == used


def test_same_seed_same_pairs_other_seed_other_pairs():
    documents = make_documents([[5, 8, 13, 21, 3] * 5 for _ in range(10)])
    options = PairOptions(max_seq_length=48)

    def run(seed):
        return [(i.tokens_a.tolist(), i.tokens_b.tolist(), i.is_random_next)
                for i in create_instances(documents, options, random.Random(seed))]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_short_targets_make_short_pairs():
    documents = make_documents([[4] * 200 for _ in range(5)])
    options = PairOptions(max_seq_length=128, short_seq_prob=1.0)
    instances = list(create_instances(documents, options, random.Random(4)))
    assert all(i.short_target for i in instances)
    lengths = [len(i.tokens_a) + len(i.tokens_b) for i in instances]
    assert np.mean(lengths) < 0.7 * options.max_num_tokens


def test_encode_instance_layout():
    documents = make_documents([[3, 2], [4]])
    instance = next(create_instances(documents, PairOptions(max_seq_length=32, nsp_probability=0.0), random.Random(0)))
    ids, types = encode_instance(instance, cls_id=2, sep_id=3)
    len_a, len_b = len(instance.tokens_a), len(instance.tokens_b)
    assert ids[0] == 2 and ids[1 + len_a] == 3 and ids[-1] == 3
    assert np.array_equal(ids[1 : 1 + len_a], instance.tokens_a)
    assert np.array_equal(types, [0] * (len_a + 2) + [1] * (len_b + 1))


@pytest.mark.parametrize("kwargs,option", [({"max_seq_length": 4}, "--max-seq-length"),
                                           ({"short_seq_prob": 1.5}, "--short-seq-prob"),
                                           ({"nsp_probability": -0.1}, "--nsp-probability")])
def test_bad_pair_options_name_the_option(kwargs, option):
    with pytest.raises(UserError, match=option):
        PairOptions(**kwargs)
