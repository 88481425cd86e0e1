"""The one rule for every command that writes: apart from the inputs, replaced only when asked
and only by the same kind, one writer at a time, nothing half-written left behind."""

import os

import pytest

from bertpre.errors import UserError
from bertpre.outputs import atomic_write, check_apart, check_replaceable, output_lock, staged_output


def test_an_output_may_not_be_contain_or_lie_inside_an_input(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "books").mkdir(parents=True)
    (corpus / "books" / "a.txt").write_text("text")
    for output, relation, source in ((corpus, "is", corpus), (corpus, "contains", corpus / "books"),
                                     (corpus / "books" / "out", "lies inside", corpus)):
        with pytest.raises(UserError, match=f"^--output {output} {relation} the input {source}; "):
            check_apart(output, [source])
    check_apart(tmp_path / "out", [corpus])  # beside it: fine
    check_apart(tmp_path / "corpus2", [corpus])  # a name that only starts like the input: fine


def test_a_symlinked_output_that_reaches_an_input_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (tmp_path / "alias").symlink_to(corpus)
    with pytest.raises(UserError, match="is the input"):
        check_apart(tmp_path / "alias", [corpus])


def test_replacing_needs_overwrite_and_the_same_kind(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "new", False, "file")
    check_replaceable(tmp_path / "empty", False, "folder")
    check_replaceable(tmp_path / "file", True, "file")
    check_replaceable(tmp_path / "folder", True, "folder")
    for path, kind, overwrite, message in ((tmp_path / "file", "file", False, "exists \\(use --overwrite"),
                                           (tmp_path / "folder", "folder", False, "exists and is not empty"),
                                           (tmp_path / "file", "folder", True, "is a file; name a folder"),
                                           (tmp_path / "folder", "file", True, "is a folder; name a file"),
                                           (tmp_path / "empty", "file", True, "is a folder; name a file")):
        with pytest.raises(UserError, match=message):
            check_replaceable(path, overwrite, kind)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    with output_lock(tmp_path / "out"):
        with pytest.raises(UserError, match="another bertpre command is writing it"):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):  # free again
        pass
    assert not list(tmp_path.iterdir()), "the lock file is removed"


def test_a_failed_staged_write_leaves_the_old_output_and_no_staging(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=True) as staging:
            (staging / "new").write_text("new")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old").read_text() == "old"
    with staged_output(out, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
