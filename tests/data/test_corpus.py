import gzip
from pathlib import Path

import pytest
from conftest import GUTENBERG, SAMPLE, WIKITEXT

from bertpre.data.corpus import (
    CorpusOptions,
    CorpusStats,
    detect_format,
    expand_inputs,
    read_documents,
    split_sentences,
)
from bertpre.errors import UserError


def read(paths, **options) -> tuple[list[list[str]], CorpusStats]:
    stats = CorpusStats()
    documents = list(read_documents([Path(p) for p in paths], CorpusOptions(**options), stats))
    return documents, stats


def test_sentence_splitter_is_not_a_naive_period_split():
    text = "Mr. Woodhouse paid 3.5 pounds to Dr. J. R. Smith at St. Paul's.  He was a\nnervous man.  Was he?  Yes!"
    assert split_sentences(text) == [
        "Mr. Woodhouse paid 3.5 pounds to Dr. J. R. Smith at St. Paul's.",
        "He was a nervous man.",
        "Was he?",
        "Yes!",
    ]


def test_formats_are_detected_from_content(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("The cat sat on the mat.\nIt was warm.\n\nA new document starts here.\nIt ends here.\n")
    jsonl = tmp_path / "docs.data"
    jsonl.write_text('{"text": "One. Two."}\n')
    assert detect_format(SAMPLE / "carroll-alice.txt") == "prose"
    assert detect_format(lines) == "lines"
    assert detect_format(jsonl) == "jsonl"
    assert detect_format(lines, "prose") == "prose"  # an explicit choice wins


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data is not present")
def test_wikitext_paragraph_lines_are_prose_and_titles_separate_documents():
    path = WIKITEXT / "valid.txt"
    assert detect_format(path) == "prose"
    documents, stats = read([path], doc_separator=r"^ = [^=].* = $")
    assert stats.documents == 60  # WikiText-2 validation has 60 articles
    assert documents[0][0].startswith("Homarus gammarus , known as the European lobster")
    assert not any(s.startswith("= ") and s.count("=") == 2 for d in documents for s in d)


def test_prose_files_are_one_document_each_and_split_into_sentences():
    documents, stats = read([SAMPLE / "carroll-alice.txt", SAMPLE / "shakespeare-caesar.txt"])
    assert stats.documents == 2 and stats.files == 2
    assert stats.sentences > 1500
    assert "Alice was beginning to get very tired of sitting by her sister on the bank" in documents[0][2]
    assert all("\n" not in s for s in documents[0])


def test_lines_format_blank_lines_separate_documents(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First sentence.\nSecond sentence.\n\n\nThird sentence.\n")
    documents, _ = read([path], format="lines")
    assert documents == [["First sentence.", "Second sentence."], ["Third sentence."]]


def test_jsonl_documents_and_field_name(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "Dr. Smith arrived. He sat down.\\n\\nLater he left."}\n\n{"body": "Alone."}\n')
    documents, _ = read([path], text_field="body")
    assert documents == [["Dr. Smith arrived.", "He sat down.", "Later he left."], ["Alone."]]
    with pytest.raises(UserError, match=r"c.jsonl:1: no field 'text'"):
        read([path])


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine."}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"c.jsonl:2: not valid JSON"):
        read([path])


def test_binary_file_is_refused_by_name(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(UserError, match=r"image.png: binary file"):
        read([path])


def test_invalid_utf8_is_replaced_and_counted_per_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\xe9 au lait.\nNa\xefve sentence.\n".encode("latin-1"))
    documents, stats = read([path], format="lines")
    assert documents == [["Caf\ufffd au lait.", "Na\ufffdve sentence."]]
    assert stats.invalid_utf8_bytes == 2
    assert stats.invalid_utf8_by_file == {str(path): 2}


def test_compressed_input(tmp_path):
    path = tmp_path / "c.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("One sentence here.\nAnother one here.\n")
    documents, _ = read([path])
    assert documents == [["One sentence here.", "Another one here."]]


def test_expand_inputs_folders_globs_and_missing(tmp_path):
    (tmp_path / "a.txt").write_text("x.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("y.")
    (tmp_path / ".hidden").write_text("z.")
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["a.txt", "b.txt"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.txt")])] == ["a.txt"]
    with pytest.raises(UserError, match="input not found: .*nothing-here"):
        expand_inputs([str(tmp_path / "nothing-here")])


@pytest.mark.skipif(not GUTENBERG.is_dir(), reason="../shared/data is not present")
def test_every_shared_gutenberg_book_reads_as_prose():
    for path in sorted(GUTENBERG.glob("*-*.txt")):
        assert detect_format(path) == "prose", path.name


def test_to_sentence_lines_script_round_trips(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "lines.txt"
    done = subprocess.run([sys.executable, str(ROOT / "data_prep" / "to_sentence_lines.py"),
                           str(SAMPLE / "carroll-alice.txt"), str(SAMPLE / "shakespeare-caesar.txt"),
                           "--output", str(out)], capture_output=True, text=True, check=True)
    assert "2 documents" in done.stdout
    original, _ = read([SAMPLE / "carroll-alice.txt", SAMPLE / "shakespeare-caesar.txt"])
    assert detect_format(out) == "lines"
    round_trip, _ = read([out])
    assert round_trip == original
