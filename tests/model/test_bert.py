from dataclasses import replace

import pytest
import torch

from bertpre.data.masking import IGNORE_INDEX, Masker, MaskingCollator, default_max_predictions
from bertpre.data.prepared import PreparedData
from bertpre.data.tokenizer import load_tokenizer
from bertpre.errors import UserError
from bertpre.model.bert import PRESETS, BertConfig, BertForPretraining, BertForSequenceClassification
from bertpre.model.hf import from_hf_state_dict, to_hf_state_dict, to_transformers
from bertpre.training.loss import pretraining_loss

transformers = pytest.importorskip("transformers")
CONFIG = BertConfig.from_preset("bert-tiny", vocab_size=300)


def random_batch(batch=3, length=20, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch, length), generator=g)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, length // 2 :] = 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 6 :] = 0
    attention_mask[2, length // 3 :] = 0
    return input_ids, token_type_ids, attention_mask


def test_shapes_full_and_sparse_mlm_head():
    torch.manual_seed(0)
    model = BertForPretraining(CONFIG).eval()
    input_ids, token_type_ids, attention_mask = random_batch()
    mlm, nsp = model(input_ids, token_type_ids, attention_mask)
    assert mlm.shape == (3, 20, 300) and nsp.shape == (3, 2)
    predict = torch.zeros(3, 20, dtype=torch.bool)
    predict[0, 3] = predict[1, 7] = predict[2, 1] = predict[2, 4] = True
    sparse, _ = model(input_ids, token_type_ids, attention_mask, predict=predict)
    assert sparse.shape == (4, 300)
    torch.testing.assert_close(sparse, mlm[predict])


def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    model = BertForPretraining(CONFIG).eval()
    input_ids, token_type_ids, attention_mask = random_batch()
    mlm, nsp = model(input_ids, token_type_ids, attention_mask)
    pad = torch.zeros(3, 12, dtype=torch.long)
    mlm_padded, nsp_padded = model(torch.cat([input_ids, pad], 1), torch.cat([token_type_ids, pad], 1),
                                   torch.cat([attention_mask, pad], 1))
    valid = attention_mask.bool()
    torch.testing.assert_close(mlm_padded[:, :20][valid], mlm[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nsp_padded, nsp, atol=1e-5, rtol=1e-5)


def test_mean_pooling_classifies_the_mean_of_the_real_tokens_without_the_pooler():
    torch.manual_seed(0)
    encoder = BertForPretraining(CONFIG)
    mean = BertForSequenceClassification(encoder, 3, pooling="mean").eval()
    assert "encoder.pooler.weight" not in mean.state_dict() and "classifier.weight" in mean.state_dict()
    input_ids, token_type_ids, attention_mask = random_batch()
    with torch.no_grad():
        logits = mean(input_ids, token_type_ids, attention_mask)  # (B, labels)
        hidden = mean.encoder.encode(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        by_row = torch.stack([hidden[i, attention_mask[i].bool()].mean(0) for i in range(3)])  # (B, H)
        pad = torch.zeros(3, 12, dtype=torch.long)
        padded = mean(*(torch.cat([t, pad], 1) for t in (input_ids, token_type_ids, attention_mask)))
    torch.testing.assert_close(logits, mean.classifier(by_row), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded, logits, atol=1e-5, rtol=1e-5)  # padding is left out of the mean
    assert "encoder.pooler.weight" in BertForSequenceClassification(BertForPretraining(CONFIG), 3).state_dict()
    with pytest.raises(UserError, match="model.pooling must be one of cls, mean, got 'max'"):
        BertForSequenceClassification(BertForPretraining(CONFIG), 3, pooling="max")


def test_decoder_is_tied_to_word_embeddings():
    """Tying: the MLM decoder reads the word-embedding matrix itself, so moving row 7 by ``d``
    moves logit 7 by exactly ``h . d`` (h: the MLM transform's output) and no other logit.
    ``d`` is taken along the two rows of ``h`` so that the expected change is large (|h|^2), never a rounding
    residue (the transform ends in a LayerNorm, so adding a constant to a row would be)."""
    generator = torch.Generator().manual_seed(0)
    model = BertForPretraining.randomly_initialised(CONFIG, seed=0)
    hidden = torch.randn(2, CONFIG.hidden_size, generator=generator)
    with torch.no_grad():
        h = model.mlm_norm(torch.nn.functional.gelu(model.mlm_dense(hidden)))  # (2, H)
        before = model.mlm_logits(hidden)
        d = (h[0] + h[1]) / (h[0] + h[1]).norm()
        model.embeddings.word.weight[7] += d
        after = model.mlm_logits(hidden)
    expected = h @ d  # (2,)
    assert expected.abs().min() > 0.1, "the test needs a change well above rounding"
    torch.testing.assert_close(after[:, 7] - before[:, 7], expected, rtol=1e-4, atol=1e-4)
    others = torch.arange(CONFIG.vocab_size) != 7
    torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=0)
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder" in n for n in names), "no separate decoder matrix"


def test_parameter_count_matches_bert_base():
    model = BertForPretraining(BertConfig.from_preset("bert-base", vocab_size=30522))
    assert abs(model.num_parameters() - 110.1e6) < 0.5e6


def test_bad_config_names_the_field():
    with pytest.raises(UserError, match="hidden_size .* divisible by num_heads"):
        BertConfig(hidden_size=100, num_heads=3)
    with pytest.raises(UserError, match="num_layers must be positive"):
        BertConfig(num_layers=0)
    with pytest.raises(UserError, match="unknown model preset"):
        BertConfig.from_preset("bert-gigantic")


@pytest.mark.parametrize("train_mode", [False, True])
def test_same_logits_as_transformers(train_mode):
    # In train mode the two implementations draw different dropout masks: compare with dropout off.
    config = replace(CONFIG, hidden_dropout=0.0, attention_dropout=0.0) if train_mode else CONFIG
    torch.manual_seed(0)
    ours = BertForPretraining(config).train(train_mode)
    theirs = to_transformers(ours, pad_token_id=0)
    input_ids, token_type_ids, attention_mask = random_batch()
    mlm, nsp = ours(input_ids, token_type_ids, attention_mask)
    out = theirs(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
    valid = attention_mask.bool()
    assert (mlm[valid] - out.prediction_logits[valid]).abs().max() <= 1e-5
    assert (nsp - out.seq_relationship_logits).abs().max() <= 1e-5


def test_one_qkv_product_gives_each_projection_transformers_gradient():
    # the model projects q, k and v in one product of the three weights side by side; the three
    # HF-named modules must still get the gradients three separate products give
    config = replace(CONFIG, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    ours = BertForPretraining(config)
    theirs = to_transformers(ours, pad_token_id=0)
    input_ids, token_type_ids, attention_mask = random_batch()
    valid = attention_mask.bool()
    mlm, _ = ours(input_ids, token_type_ids, attention_mask)
    mlm[valid].square().mean().backward()
    out = theirs(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
    out.prediction_logits[valid].square().mean().backward()
    hf = dict(theirs.named_parameters())
    for i in range(config.num_layers):
        for name in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                mine = getattr(getattr(ours.layers[i], name), kind).grad
                expected = hf[f"bert.encoder.layer.{i}.attention.self.{name}.{kind}"].grad
                assert mine is not None and mine.abs().sum() > 0, (i, name, kind)
                assert torch.allclose(mine, expected, rtol=1e-4, atol=1e-6), (i, name, kind)


def test_hf_names_round_trip():
    state = BertForPretraining(CONFIG).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state))
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


def test_collated_batch_runs_through_transformers_with_the_same_loss(sample_prepared):
    tokenizer = load_tokenizer(sample_prepared)
    train = PreparedData(sample_prepared).load_dataset()["train"].with_format("numpy")
    masker = Masker.from_tokenizer(tokenizer, default_max_predictions(64))
    torch.manual_seed(0)
    batch = MaskingCollator(masker, pad_to_multiple_of=8)([train[i] for i in range(16)])
    config = BertConfig.from_preset("bert-tiny", vocab_size=tokenizer.get_vocab_size())
    ours = BertForPretraining(config).eval()
    theirs = to_transformers(ours, pad_token_id=0)
    out = theirs(**batch)  # the batch is given as it is
    predict = batch["labels"] != IGNORE_INDEX
    mlm, nsp = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], predict=predict)
    loss = pretraining_loss(mlm, batch["labels"][predict], nsp, batch["next_sentence_label"])
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - loss.loss.item()) <= 1e-5


def test_every_preset_builds_with_the_stated_shape():
    expected = {"bert-tiny": (2, 128), "bert-mini": (4, 256), "bert-small": (4, 512), "bert-medium": (8, 512),
                "bert-base": (12, 768), "bert-large": (24, 1024)}
    assert {name: (c.num_layers, c.hidden_size) for name, c in PRESETS.items()} == expected


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = BertForPretraining(CONFIG).train()  # dropout on: checkpointing must replay the same masks
    input_ids, token_type_ids, attention_mask = random_batch()
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(1)
        mlm, nsp = model(input_ids, token_type_ids, attention_mask)
        (mlm.float().logsumexp(-1).mean() + nsp.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


def test_pre_ln_normalises_before_each_sublayer_and_once_at_the_end():
    pre = BertForPretraining.randomly_initialised(BertConfig.from_preset("bert-tiny", vocab_size=300,
                                                                         norm_placement="pre"), seed=0)
    post = BertForPretraining.randomly_initialised(CONFIG, seed=0)
    assert {n for n, _ in pre.named_parameters()} - {n for n, _ in post.named_parameters()} == \
        {"final_norm.weight", "final_norm.bias"}
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(ids)
    pre.eval(), post.eval()
    hidden = pre.encode(ids, types)
    # the last step is the final LayerNorm: zero mean, unit variance per position
    torch.testing.assert_close(hidden.mean(-1), torch.zeros(2, 12), atol=1e-5, rtol=0)
    # by hand: one pre-LN layer is x + attn(norm(x)), then + ffn(norm(.)); the final norm after the last layer
    x = pre.embeddings(ids, types)
    for layer in pre.layers:
        x = x + layer._attention(layer.attention_norm(x), None)
        x = x + layer._ffn(layer.ffn_norm(x))
    torch.testing.assert_close(hidden, pre.final_norm(x))
    assert not torch.allclose(hidden, post.encode(ids, types)), "pre-LN is another function"
    with pytest.raises(UserError, match="norm_placement must be 'post' or 'pre'"):
        BertConfig(norm_placement="sandwich")


def test_sinusoidal_position_init_encodes_offsets_at_bert_scale():
    config = replace(PRESETS["bert-mini"], vocab_size=100, position_init="sinusoidal")
    table = BertForPretraining.randomly_initialised(config).embeddings.position.weight.detach()  # (512, 256)
    assert table.std().item() == pytest.approx(config.initializer_range, rel=0.05)  # same scale as BERT's init
    # a dot product depends on the offset only: what attention needs to find a neighbour from step 0
    gram = table @ table.T  # (512, 512)
    for offset in (1, 5, 40):
        along = torch.diagonal(gram, offset)
        assert (along.max() - along.min()).item() < 1e-3 * gram.diagonal().mean().item() + 1e-6
    assert gram[0, 1] > gram[0, 40]  # nearer positions are more alike
    normal = BertForPretraining.randomly_initialised(replace(config, position_init="normal"))
    assert torch.diagonal(normal.embeddings.position.weight @ normal.embeddings.position.weight.T, 1).std() > 1e-3
    with pytest.raises(UserError, match="model.config.position_init"):
        replace(config, position_init="rotary")
