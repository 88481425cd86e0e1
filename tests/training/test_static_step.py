"""The training step has static shapes and no host sync: Google's fixed prediction slots instead
of boolean indexing, so one step runs no data-dependent op and compiles into one graph that
real batches of different content never recompile."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bertpre.data.masking import IGNORE_INDEX, Masker, MaskingCollator, default_max_predictions
from bertpre.data.prepared import PreparedData
from bertpre.model.bert import PRESETS, BertForPretraining
from bertpre.training.loss import pretraining_loss

# ops whose output shape or value the host must read from the data (a sync on a GPU); boolean-mask
# indexing dispatches as `index` with a bool tensor
DATA_DEPENDENT = {"nonzero", "_local_scalar_dense", "masked_select", "item", "unique", "_unique2"}


def bool_indexing(func, args) -> bool:
    return func.overloadpacket.__name__ in ("index", "index_put", "index_put_") and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = "bool-index" if bool_indexing(func, args) else func.overloadpacket.__name__
        self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def real_batches(prepared_path, count: int, batch_size: int = 8, pad_to: int | None = 8):
    prepared = PreparedData(prepared_path)
    rows = prepared.load_dataset()["train"].with_format("numpy")
    masker = Masker.from_tokenizer(prepared.tokenizer, default_max_predictions(prepared.max_seq_length))
    collate = MaskingCollator(masker, pad_to, seed=3)
    for i in range(count):
        examples = [dict(rows[j], draw=j) for j in range(i * batch_size, (i + 1) * batch_size)]
        yield collate(examples)


def model_for(prepared_path, **overrides):
    from dataclasses import replace

    prepared = PreparedData(prepared_path)
    config = replace(PRESETS["bert-tiny"], vocab_size=prepared.vocab_size, **overrides)
    return BertForPretraining.randomly_initialised(config, seed=0)


def slot_loss(model, batch):
    mlm, nsp = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                     positions=batch["mlm_positions"])
    return pretraining_loss(mlm, batch["mlm_labels"], nsp, batch["next_sentence_label"])


def test_slots_are_the_dense_labels_in_a_fixed_shape(sample_prepared):
    for batch in real_batches(sample_prepared, 4):
        positions, labels = batch["mlm_positions"], batch["mlm_labels"]
        assert positions.shape == labels.shape == (8, default_max_predictions(64))
        dense = torch.full_like(batch["labels"], IGNORE_INDEX)
        filled = labels != IGNORE_INDEX
        rows = torch.arange(8)[:, None].expand_as(positions)
        dense[rows[filled], positions[filled]] = labels[filled]
        assert torch.equal(dense, batch["labels"])
        assert (positions[~filled] == 0).all()


def test_the_slot_step_gives_the_masked_step_s_losses_and_gradients(sample_prepared):
    """The loss on fixed slots equals the loss on boolean-selected positions (today's eager step)."""
    for batch in real_batches(sample_prepared, 3):
        a, b = model_for(sample_prepared), model_for(sample_prepared)
        predict = batch["labels"] != IGNORE_INDEX
        torch.manual_seed(1)  # the same dropout masks in both
        mlm, nsp = a(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], predict=predict)
        masked = pretraining_loss(mlm, batch["labels"][predict], nsp, batch["next_sentence_label"])
        torch.manual_seed(1)
        slots = slot_loss(b, batch)
        for name in ("loss", "mlm_loss", "mlm_accuracy", "num_predicted"):
            assert abs(float(getattr(masked, name)) - float(getattr(slots, name))) <= 1e-6, name
        masked.loss.backward()
        slots.loss.backward()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_one_training_step_runs_no_data_dependent_op(sample_prepared):
    batch = next(real_batches(sample_prepared, 1))
    model = model_for(sample_prepared).train()
    with OpCounter() as counter:
        out = slot_loss(model, batch)
        out.loss.backward()
    assert counter.seen.get("addmm", 0) + counter.seen.get("mm", 0) > 10, "the counter sees the step's ops"
    found = (DATA_DEPENDENT | {"bool-index"}) & set(counter.seen)
    assert not found, {k: counter.seen[k] for k in found}
    # the boolean-indexed step it replaces would have shown up
    with OpCounter() as counter:
        predict = batch["labels"] != IGNORE_INDEX
        model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], predict=predict)
    assert "bool-index" in counter.seen


@pytest.mark.slow
def test_the_step_compiles_to_one_graph_that_real_batches_never_recompile(sample_prepared):
    """fullgraph=True fails on any graph break; the fail_on_recompile stance fails on any
    recompile over five real batches of different content (padded to the prepared length)."""
    torch._dynamo.reset()
    model = model_for(sample_prepared, hidden_dropout=0.0, attention_dropout=0.0).train()
    eager = model_for(sample_prepared, hidden_dropout=0.0, attention_dropout=0.0).train()

    def step(batch):
        return slot_loss(model, batch).loss

    compiled = torch.compile(step, fullgraph=True)
    batches = list(real_batches(sample_prepared, 5, pad_to=64))
    assert len({tuple(b["input_ids"][0, :5].tolist()) for b in batches}) == 5, "different content"
    losses = [compiled(batches[0])]
    with torch.compiler.set_stance("fail_on_recompile"):
        for batch in batches[1:]:
            losses.append(compiled(batch))
    for batch, loss in zip(batches, losses):
        reference = slot_loss(eager, batch).loss
        assert abs(loss.item() - reference.item()) <= 1e-4
    losses[-1].backward()  # the backward graph compiles too, and matches eager's
    slot_loss(eager, batches[-1]).loss.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def guard_steps(action: str, values: list[float]):
    """Run NonFiniteGuard's per-step hook over steps whose loss and gradients hold ``values``."""
    from types import SimpleNamespace

    from bertpre.training.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(action, max_in_a_row=10)
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters())
    trainer = SimpleNamespace(global_step=0, world_size=1, precision_plugin=SimpleNamespace(), is_global_zero=False,
                              log_every_n_steps=50)
    with OpCounter() as counter:
        for step, value in enumerate(values):
            trainer.global_step = step
            for p in layer.parameters():
                p.grad = torch.full_like(p, value)
            guard.observe(torch.tensor(value))
            guard.on_before_optimizer_step(trainer, None, optimizer)
    return guard, trainer, counter.seen


def test_the_stop_guard_reads_nothing_from_the_device_between_its_checks():
    from bertpre.errors import UserError

    guard, trainer, seen = guard_steps("stop", [1.0, float("nan"), 2.0, float("inf")])
    assert seen.get("where", 0) == 4 and seen.get("_foreach_norm", 0) == 4, "the counter sees the guard's ops"
    assert not DATA_DEPENDENT & set(seen), seen
    trainer.global_step = 4
    with pytest.raises(UserError, match=r"^step 2: non-finite loss nan and gradient norm nan; stopping "
                                        r"\(model.nonfinite: stop; seen at step 4\)"):
        guard.check(trainer)
    # skip must decide at each step, so it reads the verdict every step
    _, _, seen = guard_steps("skip", [1.0, float("nan"), 2.0])
    assert seen.get("_local_scalar_dense", 0) >= 3


def test_compile_mode_reaches_torch_compile_and_is_checked(sample_prepared, monkeypatch):
    from bertpre.data.datamodule import PretrainDataModule
    from bertpre.errors import UserError
    from bertpre.lightning_cli import connect
    from bertpre.model.bert import BertConfig
    from bertpre.training.pretraining import PretrainModule

    small = BertConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
    with pytest.raises(UserError, match="model.compile_mode must be one of default, reduce-overhead, max-autotune"):
        PretrainModule(small, compile=True, compile_mode="fastest")
    with pytest.raises(UserError, match="model.compile_mode max-autotune needs model.compile: true"):
        PretrainModule(small, compile_mode="max-autotune")
    modes = []
    monkeypatch.setattr(BertForPretraining, "compile", lambda self, **kw: modes.append(kw.get("mode", "unset")))
    for mode in (None, "max-autotune-no-cudagraphs"):
        module = PretrainModule(small, compile=True, compile_mode=mode)
        connect(module, PretrainDataModule(str(sample_prepared), batch_size=2))
        module.configure_model()
    assert modes == [None, "max-autotune-no-cudagraphs"]  # None: torch's default mode
