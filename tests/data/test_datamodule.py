"""The pretraining data module: ranks see disjoint data and the same global batches."""

from pathlib import Path
from types import SimpleNamespace

from bertpre.data.datamodule import PretrainDataModule
from bertpre.data.prepared import PreparedData


def loader_indices(data_path: Path, world: int, rank: int, batch_size: int, epoch: int = 0) -> list[list[int]]:
    data = PretrainDataModule(str(data_path), batch_size=batch_size)
    data.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [list(batch) for batch in loader.batch_sampler]


def test_ranks_see_disjoint_data_and_the_same_global_batches(sample_prepared):
    single = loader_indices(sample_prepared, world=1, rank=0, batch_size=8)
    ranks = [loader_indices(sample_prepared, world=2, rank=r, batch_size=4) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]), "equal batch counts per rank: no rank waits forever"
    seen = [set(i for batch in r for i in batch) for r in ranks]
    assert not seen[0] & seen[1]
    assert all(len(s) == sum(map(len, r)) for s, r in zip(seen, ranks)), "no row twice on a rank"
    rows = len(PreparedData(sample_prepared).load_dataset()["train"])
    unseen = set(range(rows)) - seen[0] - seen[1]
    assert len(unseen) < 2 * 4, "only the tail that fills no global batch is left out"
    later = [loader_indices(sample_prepared, world=2, rank=r, batch_size=4, epoch=1) for r in (0, 1)]
    assert unseen != set(range(rows)) - {i % rows for r in later for batch in r for i in batch}, "another tail each epoch"
    for step, (a, b) in enumerate(zip(*ranks)):
        assert sorted(a + b) == sorted(single[step]), "global batch of 2 ranks x 4 == one process x 8"
    assert loader_indices(sample_prepared, 1, 0, 8, epoch=1) != single, "reshuffled each epoch"
