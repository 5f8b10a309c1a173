"""Real-text sources: each document read once, license texts never, held-out disjoint from train."""

from __future__ import annotations

import gzip
import os
import shutil

import pytest
import torch

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


# ------------------------------------------------------------------------------ mixtures
def test_mixture_counts_follow_the_weights():
    assert corpus.mixture_counts({"a": 100, "b": 100}, {"a": 3, "b": 1}, 40) == {"a": 30, "b": 10}
    # no total: as many as the scarcest source allows at its share
    assert corpus.mixture_counts({"a": 100, "b": 5}, {"a": 0.5, "b": 0.5}, None) == {"a": 5, "b": 5}
    assert sum(corpus.mixture_counts({"a": 9, "b": 9, "c": 9}, {"a": 1, "b": 1, "c": 1}, 7).values()) == 7
    with pytest.raises(ValueError, match=r"source 'b' has 5 items .* needs 20"):
        corpus.mixture_counts({"a": 100, "b": 5}, {"a": 1, "b": 1}, 40)
    with pytest.raises(ValueError, match="positive"):
        corpus.mixture_counts({"a": 1}, {"a": 0}, None)


@pytest.fixture
def two_sources(tmp_path):
    """Two globs of distinct documents and a tokenizer trained on them."""
    from conftest import tiny_tokenizer

    texts = {}
    for name, word in (("alpha", "apples and pears "), ("beta", "rivers and hills ")):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(20):
            texts[f"{name}{i}"] = f"{name} document {i}: " + word * 150
            (folder / f"{i}.txt").write_text(texts[f"{name}{i}"])
    tok = tiny_tokenizer(list(texts.values()))
    return tok, {str(tmp_path / "alpha" / "*.txt"): 3.0, str(tmp_path / "beta" / "*.txt"): 1.0}


def test_mixture_rows_come_from_each_source_train_split_only(two_sources):
    tok, sources = two_sources
    rows, counts = corpus.build_mixture_sequences(tok, sources, 32, "train", 0.1, 0, max_sequences=40)
    assert rows.shape == (40, 32) and list(counts.values()) == [30, 10]
    held = {
        src: {tuple(r.tolist()) for r in corpus.build_token_sequences(tok, src, 32, "heldout", 0.1, 0)}
        for src in sources
    }
    train = {
        src: {tuple(r.tolist()) for r in corpus.build_token_sequences(tok, src, 32, "train", 0.1, 0)}
        for src in sources
    }
    got = [tuple(r.tolist()) for r in rows]
    a, b = sources
    assert sum(r in train[a] for r in got) == 30 and sum(r in train[b] for r in got) == 10
    assert not any(r in held[a] | held[b] for r in got if r not in train[a] | train[b])
    # the rows are shuffled across sources, deterministically
    assert got != sorted(got, key=lambda r: r in train[b])
    again, _ = corpus.build_mixture_sequences(tok, sources, 32, "train", 0.1, 0, max_sequences=40)
    assert torch.equal(rows, again)


def test_mixture_documents_share_tokens_by_weight(two_sources):
    tok, sources = two_sources
    docs, taken = corpus.build_mixture_documents(tok, sources, "train", 0.1, 0)
    a, b = sources
    assert taken[a] == pytest.approx(3 * taken[b], rel=0.02)
    assert sum(len(d) for d in docs) == taken[a] + taken[b]


def test_recipe_takes_sources_or_text_glob_not_both():
    from modelopt_dms.training.recipe import DataSection

    assert DataSection(sources={"python-docs": 1, "manpages": 1}).sources == {"python-docs": 1, "manpages": 1}
    with pytest.raises(ValueError, match="not both"):
        DataSection(sources={"python-docs": 1}, text_glob="x/*.txt")
    with pytest.raises(ValueError, match="weight > 0"):
        DataSection(sources={"python-docs": 0})
