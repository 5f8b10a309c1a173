"""Real-text sources: each document read once, license texts never, held-out disjoint from train."""

from __future__ import annotations

import gzip
import os
import shutil

import pytest

from modelopt_dms import corpus, text_sources
from modelopt_dms.text_sources import SOURCES, html_to_text, is_license_text, read_file, read_source

BODY = "Delayed eviction keeps a token visible for a window of later steps. " * 40


@pytest.fixture
def linked_docs(tmp_path):
    """30 documents, reached again through a linked folder and a renamed copy, plus license texts."""
    real = tmp_path / "real"
    real.mkdir()
    for i in range(30):
        (real / f"doc{i:02d}.txt").write_text(f"Document {i}. " + BODY)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    shutil.copy(real / "doc03.txt", real / "copy_of_doc03.txt")
    (real / "LICENSE.txt").write_text("Permission is hereby granted " * 100)
    (real / "COPYING").write_text("GNU GENERAL PUBLIC LICENSE " * 100)
    return tmp_path


def test_each_document_is_read_once_through_links_and_copies(linked_docs):
    docs = corpus.read_text_files(str(linked_docs / "**" / "*"))
    texts = [t for _, t in docs]
    assert len(docs) == 30 and len(set(texts)) == 30
    assert set(texts) == {(linked_docs / "real" / f"doc{i:02d}.txt").read_text() for i in range(30)}
    assert all(os.path.realpath(p).startswith(str(linked_docs / "real")) for p, _ in docs)


def test_license_texts_are_never_documents(linked_docs):
    docs = corpus.read_text_files(str(linked_docs / "**" / "*"))
    assert not any("License" in t or "LICENSE" in t for _, t in docs)
    for path in ("/usr/share/common-licenses/GPL-3", "a/COPYING", "b/LICENSE.md", "doc/x/copyright"):
        assert is_license_text(path), path
    assert not is_license_text("/usr/share/doc/python3/html/_sources/library/copy.rst.txt")


def test_heldout_split_shares_no_file_and_no_text_with_train(linked_docs):
    docs = corpus.read_text_files(str(linked_docs / "**" / "*"))
    split = corpus._split(docs, 0.2, seed=0)
    train, held = split["train"], split["heldout"]
    assert len(held) == 6 and len(train) == 24
    assert not {os.path.realpath(p) for p, _ in train} & {os.path.realpath(p) for p, _ in held}
    assert not {t for _, t in train} & {t for _, t in held}


def test_a_glob_matching_nothing_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No text files match .*own \.txt files"):
        corpus.read_text_files(str(tmp_path / "none" / "*.txt"))
    missing = text_sources.TextSource("nowhere", (str(tmp_path / "no" / "*"),), "text", "some-pkg")
    SOURCES["nowhere"] = missing
    try:
        with pytest.raises(FileNotFoundError, match=r"apt-get install -y some-pkg"):
            read_source("nowhere")
        # the old text_glob spelling of a named source is that source
        assert text_sources.named_source(missing.patterns[0]) is missing
    finally:
        del SOURCES["nowhere"]


def test_html_pages_become_their_visible_text(tmp_path):
    page = (
        "<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<script>var hidden = 1;</script><h1>Backups</h1><p>Keep   copies\nof &amp; data.</p>"
        "<pre>tar  -czf\n  x.tgz</pre></body></html>"
    )
    text = html_to_text(page)
    assert "hidden" not in text and "color" not in text and "<" not in text
    assert "Backups\n\nKeep copies of & data." in text and "tar  -czf\n  x.tgz" in text
    gz = tmp_path / "page.html.gz"
    gz.write_bytes(gzip.compress(page.encode()))
    assert read_file(str(gz)) == text


def test_fortune_separators_become_blank_lines(tmp_path):
    f = tmp_path / "fortunes"
    f.write_text("First saying.\n%\nSecond saying,\n\t-- someone\n%\n")
    out = read_file(str(f), "fortune")
    assert out == "First saying.\n\nSecond saying,\n\t-- someone\n"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed (make data)")
def test_man_pages_render_as_the_terminal_shows_them(tmp_path):
    page = tmp_path / "man1" / "demo.1.gz"
    page.parent.mkdir()
    source = ".TH DEMO 1\n.SH NAME\ndemo \\- shows a page\n.SH DESCRIPTION\n\\fBdemo\\fR evicts tokens.\n"
    page.write_bytes(gzip.compress(source.encode()))
    text = read_file(str(page))
    assert "NAME" in text and "demo - shows a page" in text.replace("\u2010", "-")
    assert "demo evicts tokens." in text and "\x08" not in text and "\\fB" not in text
    stub = tmp_path / "man1" / "alias.1.gz"
    stub.write_bytes(gzip.compress(b".so man1/demo.1\n"))
    assert read_file(str(stub)) == ""


def test_named_sources_are_cached_and_reread_the_same(tmp_path, monkeypatch, linked_docs):
    src = text_sources.TextSource("fixture", (str(linked_docs / "real" / "*.txt"),), "text", "pkg")
    monkeypatch.setitem(SOURCES, "fixture", src)
    first = read_source("fixture", str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("text-fixture-*.json"))) == 1
    assert read_source("fixture", str(tmp_path / "cache")) == first == read_source("fixture")


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_installed_sources_split_without_overlap(name):
    if not text_sources.source_files(name):
        pytest.skip(f"{SOURCES[name].package} not installed (make data)")
    if name == "manpages" and shutil.which("groff") is None:
        pytest.skip("groff not installed (make data)")
    docs = corpus.read_text_files(name, cache_dir=corpus.DEFAULT_CACHE_DIR)
    assert len(docs) >= 10
    split = corpus._split(docs, corpus.DEFAULT_HELDOUT_FRACTION, corpus.DEFAULT_SPLIT_SEED)
    train, held = split["train"], split["heldout"]
    assert not {os.path.realpath(p) for p, _ in train} & {os.path.realpath(p) for p, _ in held}
    assert not {t for _, t in train} & {t for _, t in held}
    assert not any(is_license_text(p) for p, _ in docs)
