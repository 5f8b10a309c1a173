"""Named sources of real English text installed by Debian packages, read as plain-text documents.

A source spec is a name from :data:`SOURCES` or a glob of files. Files are decoded by kind: HTML
(tags dropped, scripts and styles skipped), ``.gz`` (gunzipped), man pages (rendered by ``groff``),
fortune files (the ``%`` separators become blank lines); anything else is read as text. License
texts (``COPYING``, ``LICENSE``, Debian ``copyright`` files, ``common-licenses``) are never returned:
they are evaluation material, not training data (docs/design.md §8).

Rendering man pages takes about 40 ms each, so documents of a named source are cached as JSON
under ``cache_dir``, keyed by the paths, sizes and modification times of its files.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .fileio import atomic_write_text

__all__ = ["SOURCES", "TextSource", "is_license_text", "named_source", "read_source", "source_files"]

LICENSE_PATTERN = re.compile(r"(^|/)(copying|licen[cs]e|copyright)([._-][^/]*)?$|/common-licenses/", re.I)


def is_license_text(path: str) -> bool:
    """Whether ``path`` is a license text (never training data)."""
    return bool(LICENSE_PATTERN.search(path))


@dataclass(frozen=True)
class TextSource:
    """One installed real-text corpus: where its files are, how to read them, how to get it."""

    name: str
    patterns: tuple[str, ...]
    kind: str  # "text" | "html" | "man" | "fortune"
    package: str  # the Debian package(s) that install it
    exclude: str = r"$^"  # regex of paths to skip (duplicates, non-prose)
    dpkg_lists: tuple[str, ...] = ()  # restrict to files these packages own (when the lists exist)


SOURCES: dict[str, TextSource] = {
    s.name: s
    for s in (
        TextSource(
            "python-docs", ("/usr/share/doc/python3*/html/_sources/**/*.rst.txt",), "text", "python3-doc"
        ),
        TextSource(
            "debian-reference", ("/usr/share/debian-reference/*.en.html",), "html", "debian-reference-en"
        ),
        TextSource(
            "doc-debian",
            (
                "/usr/share/doc/debian/FAQ/*.en.html",
                "/usr/share/doc/debian/*.txt",
                "/usr/share/doc/debian/*.gz",
            ),
            "html",
            "doc-debian",
            # older versions of the constitution and social contract repeat the current one
            exclude=r"\.\d+\.\d+\.txt\.gz$|changelog",
        ),
        TextSource(
            "manpages",
            ("/usr/share/man/man[1-8]/*.gz",),
            "man",
            "manpages manpages-dev groff-base",
            dpkg_lists=("/var/lib/dpkg/info/manpages.list", "/var/lib/dpkg/info/manpages-dev.list"),
        ),
        TextSource(
            "fortunes",
            ("/usr/share/games/fortunes/*",),
            "fortune",
            "fortunes",
            exclude=r"\.(dat|u8)$|ascii-art$",
        ),
    )
}


def named_source(spec: str) -> TextSource | None:
    """The source ``spec`` names, by name or by its only pattern (the old ``text_glob`` form)."""
    if spec in SOURCES:
        return SOURCES[spec]
    return next((s for s in SOURCES.values() if s.patterns == (spec,)), None)


def source_files(spec: str) -> list[str]:
    """Sorted distinct files of a named source or a glob, license texts removed.

    A file reached through several paths (Debian links ``python3-doc/html`` and five other folders
    to one copy of the Python docs) is returned once, under its first path: otherwise a held-out
    file would also sit in the train split under another name.
    """
    source = named_source(spec)
    patterns = source.patterns if source else (spec,)
    paths = {p for pat in patterns for p in glob.glob(pat, recursive=True)}
    if source is not None:
        skip = re.compile(source.exclude)
        paths = {p for p in paths if not skip.search(p)}
        owned = _dpkg_owned(source.dpkg_lists)
        if owned is not None:
            paths &= owned
    first: dict[str, str] = {}
    for p in sorted(paths):
        real = os.path.realpath(p)
        if os.path.isfile(real) and not is_license_text(p) and not is_license_text(real):
            first.setdefault(real, p)
    return sorted(first.values())


def _dpkg_owned(lists: tuple[str, ...]) -> set[str] | None:
    present = [f for f in lists if os.path.exists(f)]
    if not present:
        return None
    return {line.strip() for f in present for line in Path(f).read_text().splitlines()}


def read_source(spec: str, cache_dir: str | None = None) -> list[tuple[str, str]]:
    """``(path, text)`` of every document of ``spec`` (a name from :data:`SOURCES` or a glob)."""
    source = named_source(spec)
    paths = source_files(spec)
    if not paths:
        hint = (
            f"install it with `apt-get install -y {source.package}` (make data)"
            if source
            else "check the glob, point it at your own .txt files, or use a named source: "
            + ", ".join(SOURCES)
        )
        raise FileNotFoundError(f"No text files match {spec!r}: {hint}.")
    kind = source.kind if source else None
    if cache_dir is None or source is None:
        return _distinct((p, read_file(p, kind)) for p in paths)
    stamp = [(p, os.path.getsize(p), int(os.path.getmtime(p))) for p in paths]
    digest = hashlib.sha256(json.dumps([spec, stamp]).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"text-{source.name}-{digest}.json"
    if cached.exists():
        return [tuple(d) for d in json.loads(cached.read_text())]
    docs = _distinct((p, read_file(p, kind)) for p in paths)
    atomic_write_text(cached, json.dumps(docs))
    return docs


def _distinct(docs) -> list[tuple[str, str]]:
    """Drop documents whose text repeats an earlier one (copies under other names)."""
    seen: set[str] = set()
    out = []
    for path, text in docs:
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append((path, text))
    return out


def read_file(path: str, kind: str | None = None) -> str:
    """The plain text of one file (``kind`` from its source, else guessed from the name)."""
    kind = kind or _guess_kind(path)
    if kind == "man":
        return render_man_page(path)
    raw = _read_bytes(path).decode("utf-8", errors="replace")
    if kind == "fortune":
        return re.sub(r"\n%\n", "\n\n", raw).strip() + "\n"
    if kind == "html" and _looks_like_html(path, raw):
        return html_to_text(raw)
    return raw


def _guess_kind(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".html", ".htm")):
        return "html"
    if re.search(r"/man\d[^/]*/[^/]+\.\d\w*$", name):
        return "man"
    return "text"


def _looks_like_html(path: str, text: str) -> bool:
    head = text.lstrip()[:15].lower()
    return path.endswith((".html", ".htm", ".html.gz")) or head.startswith(("<!doctype", "<html"))


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


class _TextExtractor(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table"}
    SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):  # noqa: D102
        if tag in self.SKIP:
            self.skipping += 1
        elif tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):  # noqa: D102
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):  # noqa: D102
        if not self.skipping:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page: paragraphs separated by blank lines, whitespace collapsed."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def render_man_page(path: str) -> str:
    """A man page as the terminal shows it (``groff -mandoc -Tutf8``, no overstriking)."""
    groff = shutil.which("groff")
    if groff is None:
        raise FileNotFoundError("man pages need groff to render: apt-get install -y groff-base")
    source = _read_bytes(path)
    if source.lstrip().startswith(b".so "):  # a redirect to another page: no text of its own
        return ""
    proc = subprocess.run(
        [groff, "-mandoc", "-Tutf8", "-P-cbou"],
        input=source,
        capture_output=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "80"},
        check=False,
    )
    return proc.stdout.decode("utf-8", errors="replace")
