"""bertpre inspect: the statistics it prints and the figure it draws beside the folder."""


import pytest

from bertpre.cli import main
from bertpre.data.prepared import PreparedData


def test_inspect_prints_statistics_and_draws_them(sample_prepared, tmp_path, capsys):
    main(["inspect", str(sample_prepared), "--plot", str(tmp_path / "report.png")])
    out = capsys.readouterr().out
    assert "NotNext" in out and "never used in train" in out and str(tmp_path / "report.png") in out
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from bertpre.data.inspect import token_counts

    prepared = PreparedData(sample_prepared)
    counts = token_counts(prepared)
    train = prepared.load_dataset()["train"]
    assert counts.sum() == sum(len(ids) for ids in train["input_ids"])
    assert counts[prepared.tokenizer.token_to_id("[CLS]")] == len(train)


def test_inspect_draws_beside_the_folder_never_into_it(sample_prepared, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_prepared, data)
    before = sorted(p.name for p in data.rglob("*"))
    main(["inspect", str(data)])
    assert (tmp_path / "data-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "data-report.png") in capsys.readouterr().out
    assert sorted(p.name for p in data.rglob("*")) == before
    with pytest.raises(SystemExit):
        main(["inspect", str(data), "--plot", str(data / "figure.png")])
    assert "--plot" in capsys.readouterr().err and not (data / "figure.png").exists()
