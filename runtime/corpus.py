"""The embedded corpus: real text present on any Debian machine with Python 3.11 and this project's
venv, no download, in the domains ``DOMAINS``, cut into natural units.

Files:

- ``code``: standard-library ``.py`` files (no test packages, which Debian ships apart; no
  ``pydoc_data/topics.py``, which is prose).
- ``prose``: ``/usr/share/common-licenses/*``, the reference-manual topics of
  ``pydoc_data.topics``, and the ``METADATA`` long descriptions and licence files of the
  site-packages ``*.dist-info`` folders.
- ``tables``: numpy's ``tests/data/*.csv`` (generator and ufunc validation sets), matplotlib's
  ``sample_data/*.csv`` and ``fonts/afm/*.afm`` font metrics, ``zoneinfo/*.tab`` (the system's,
  else the ``tzdata`` wheel's), ``/etc/services``, ``/etc/protocols``, ``/etc/mime.types``.

Symlinks, empty files and exact duplicates are skipped. Each domain is capped at
``DOMAIN_BUDGET_BYTES`` of files: candidates are taken in CRC-32 order of their names while they
fit (a spread sample, not the alphabetical head), then sorted by name.

A document is not a whole file (a whole file is one long sequence, which the length policy
would cut into pieces of exactly ``data.max_seq_len``) but a natural unit of one, so that
lengths in a batch vary as in real corpora, from tens of bytes to tens of KB:

- code: the module header (docstring, imports, constants before the first definition), then each
  top-level ``def``/``class`` block with its decorators and the comments just above it, and each
  run of other top-level statements between definitions. Definitions are found by a line scan
  that skips multi-line strings (``ast`` would cost a second per 3 MB).
- prose: sections. A section starts at a heading (Markdown ``#``, a reStructuredText or pydoc
  title over an underline, a numbered clause such as ``3. Definitions``, a short one-line
  paragraph such as ``Preamble``) or after two or more blank lines, and runs to the next; a
  heading stays with the body that follows it.
- tables: blocks of rows. A block ends where a comment line follows rows (a new section of
  ``/etc/services``) or after a number of rows drawn from 2 to 512, log-uniform, by the CRC-32
  of the file's name and the block's number (deterministic, different for every block); blank
  lines are not rows (in font metrics they only group kerning pairs), and the file's leading
  comments and column header go with its first block.

The units of a file are consecutive and together are the file, byte for byte; whitespace-only
units and repeats of a unit already taken (shared licence clauses, ``if __name__ ==
"__main__"`` tails) are left out.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sysconfig
import zlib
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DOMAINS", "DOMAIN_BUDGET_BYTES", "embedded_documents", "split_units"]

DOMAINS = ("code", "prose", "tables")
# 3 MiB per domain keeps loading under a second and still gives thousands of documents.
DOMAIN_BUDGET_BYTES = 3 * 2**20
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_LICENCE_PREFIXES = ("LICEN", "COPYING", "NOTICE", "AUTHORS")


# Candidate files.


@dataclass(frozen=True)
class _Candidate:
    name: str
    size: int
    read: Callable[[], bytes]


def _files(
    root: Path, suffix: str, prefix: str, keep: Callable[[str], bool] | None = None, skip_dirs=_SKIPPED_DIRS
) -> Iterator[_Candidate]:
    """Regular non-empty files under ``root`` ending in ``suffix``, in sorted order, no symlinks."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        # sorting in place makes os.walk's order deterministic
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if name.endswith(suffix) and (keep is None or keep(rel)) and path.is_file() and not path.is_symlink():
                size = path.stat().st_size
                if size > 0:
                    yield _Candidate(f"{prefix}/{rel}", size, path.read_bytes)


def _package_dir(name: str) -> Path | None:
    # find_spec locates a package without importing it (matplotlib takes ~0.5 s to import)
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _code() -> Iterator[_Candidate]:
    root = Path(sysconfig.get_paths()["stdlib"])
    yield from _files(root, ".py", "stdlib", keep=lambda rel: rel != "pydoc_data/topics.py")


def _is_licence(rel: str) -> bool:
    """Licence texts of a dist-info folder: LICENSE*, COPYING*, ... or anything under licenses/."""
    return rel.startswith("licenses/") or ("/" not in rel and rel.upper().startswith(_LICENCE_PREFIXES))


def _prose() -> Iterator[_Candidate]:
    yield from _files(Path("/usr/share/common-licenses"), "", "common-licenses")
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        text = topics[key].encode("utf-8")
        yield _Candidate(f"pydoc-topics/{key}", len(text), lambda text=text: text)
    site = Path(sysconfig.get_paths()["purelib"])
    for info in sorted(site.glob("*.dist-info")):
        meta = info / "METADATA"
        if meta.is_file():
            # the long description follows the header block
            body = lambda meta=meta: meta.read_bytes().partition(b"\n\n")[2].strip()  # noqa: E731
            yield _Candidate(f"dist-info/{info.name}/METADATA", meta.stat().st_size, body)
        yield from _files(info, "", f"dist-info/{info.name}", keep=_is_licence)


def _tables() -> Iterator[_Candidate]:
    numpy_dir = _package_dir("numpy")
    if numpy_dir is not None:
        # numpy's data tables sit in tests/data folders, which the default walk skips
        yield from _files(numpy_dir, ".csv", "numpy", keep=lambda rel: "/data/" in rel, skip_dirs={"__pycache__"})
    mpl_dir = _package_dir("matplotlib")
    if mpl_dir is not None:
        yield from _files(mpl_dir / "mpl-data" / "sample_data", ".csv", "matplotlib/sample_data")
        yield from _files(mpl_dir / "mpl-data" / "fonts" / "afm", ".afm", "matplotlib/afm")
    # two tzdata releases differ slightly, so take one: the system's, else the wheel's
    zoneinfo = Path("/usr/share/zoneinfo")
    if not zoneinfo.is_dir() and (tzdata := _package_dir("tzdata")) is not None:
        zoneinfo = tzdata / "zoneinfo"
    yield from _files(zoneinfo, ".tab", "zoneinfo", keep=lambda rel: "/" not in rel)
    for path in (Path("/etc/services"), Path("/etc/protocols"), Path("/etc/mime.types")):
        if path.is_file() and path.stat().st_size > 0:
            yield _Candidate(f"etc/{path.name}", path.stat().st_size, path.read_bytes)


def _select(candidates: list[_Candidate], budget: int) -> list[tuple[str, bytes]]:
    """Candidates in CRC-32-of-name order while they fit the budget, without exact duplicates."""
    chosen, seen, total = [], set(), 0
    for candidate in sorted(candidates, key=lambda c: (zlib.crc32(c.name.encode()), c.name)):
        if total + candidate.size > budget:
            continue
        data = candidate.read()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if len(data) < 2 or digest in seen:
            continue
        seen.add(digest)
        chosen.append((candidate.name, data))
        total += len(data)
    return sorted(chosen)


# Natural units. Each splitter returns the byte offsets where units start (0 first).

# Comments and string literals, in the order the tokenizer meets them (unrolled loops: linear time).
# Prefixes (r, b, f) change no string's extent, so they are left out: matching them would try every r, b, f.
_PY_STRING_OR_COMMENT = re.compile(
    rb"#[^\r\n]*"
    rb'|"""[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""'
    rb"|'''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''"
    rb'|"[^"\\\r\n]*(?:\\.[^"\\\r\n]*)*"'
    rb"|'[^'\\\r\n]*(?:\\.[^'\\\r\n]*)*'",
    re.DOTALL,
)
# Lines that start a top-level statement: column 0, not blank, not a comment or a closing bracket.
_PY_TOP_LEVEL = re.compile(rb"^[^\s#)\]}]", re.MULTILINE)
_PY_DEFINITION = re.compile(rb"(?:async[ \t]+)?(?:def|class)\b")
_PY_COMMENT_OR_BLANK = re.compile(rb"[ \t]*(?:#[^\n]*)?\r?\n")


def _line_start(data: bytes, pos: int) -> int:
    return data.rfind(b"\n", 0, pos) + 1


def _split_code(name: str, data: bytes) -> list[int]:
    # the spans of multi-line strings, where a line at column 0 is text, not a statement
    spans = [
        m.span()
        for m in _PY_STRING_OR_COMMENT.finditer(data)
        if data[m.start()] != 0x23 and data.find(b"\n", m.start(), m.end()) >= 0
    ]
    span_starts = [start for start, _ in spans]
    cuts, previous = [0], None
    for match in _PY_TOP_LEVEL.finditer(data):
        pos = match.start()
        i = bisect_right(span_starts, pos) - 1
        if i >= 0 and pos < spans[i][1]:
            continue
        kind = "decorator" if data[pos] == 0x40 else "def" if _PY_DEFINITION.match(data, pos) else "statement"
        # a definition starts a unit unless decorators just began it; the first statement after a definition too
        if (kind != "statement" and previous != "decorator") or (kind == "statement" and previous == "def"):
            start = pos
            # take the comments just above (and the blank lines between them), not the blank lines above those
            line = pos
            while line > cuts[-1]:
                above = _line_start(data, line - 1)
                comment = _PY_COMMENT_OR_BLANK.fullmatch(data, above, line)
                if comment is None:
                    break
                if data[above:line].strip():
                    start = above
                line = above
            if start > cuts[-1]:
                cuts.append(start)
        previous = kind
    return cuts


_UNDERLINE = re.compile(rb"[ \t]*([=\-~*^#+\"'`:.])\1{2,}[ \t]*\r?\n?")
_MARKDOWN_HEADING = re.compile(rb"#{1,6}[ \t]")
_NUMBERED_CLAUSE = re.compile(rb"[ \t]{0,8}(?:\d{1,2}|[IVX]{1,4})\.[ \t]")
_FENCE = re.compile(rb"[ \t]*(?:```|~~~)")
# a one-line paragraph such as "Preamble": short, not a bullet or markup, not ending like a sentence or a lead-in
_SHORT_TITLE = re.compile(rb"\w(?:.{0,58}[^.,;:\s])?")


def _is_heading(paragraph: list[bytes]) -> bool:
    first = paragraph[0]
    return (
        _MARKDOWN_HEADING.match(first) is not None
        or (len(paragraph) >= 2 and _UNDERLINE.fullmatch(paragraph[1]) is not None)
        or (len(paragraph) >= 3 and _UNDERLINE.fullmatch(first) is not None)
        or _NUMBERED_CLAUSE.match(first) is not None
        or (len(paragraph) == 1 and _SHORT_TITLE.fullmatch(first.strip()) is not None)
    )


def _split_prose(name: str, data: bytes) -> list[int]:
    lines = data.splitlines(keepends=True)
    cuts, offset, blanks, fenced, heading, lead_in, i = [0], 0, 0, False, True, False, 0
    while i < len(lines):
        if not lines[i].strip():
            blanks, offset, i = blanks + 1, offset + len(lines[i]), i + 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip():
            j += 1
        paragraph = lines[i:j]
        # a heading or a lead-in ("Install it with:") keeps the next paragraph, which after a
        # lead-in is body (an example, a list), never a heading; so does an open code fence
        bound = fenced or heading or lead_in
        heading = not (fenced or lead_in) and _is_heading(paragraph)
        if not bound and (heading or blanks >= 2):
            cuts.append(offset)
        lead_in = paragraph[-1].rstrip().endswith(b":")
        fenced ^= sum(_FENCE.match(line) is not None for line in paragraph) % 2 == 1
        blanks, offset, i = 0, offset + sum(map(len, paragraph)), j
    return cuts


def _split_table(name: str, data: bytes) -> list[int]:
    cuts, rows, offset, previous, header = [0], 0, 0, b"", True
    limit = _block_rows(name, 0)
    for line in data.splitlines(keepends=True):
        blank, comment = not line.strip(), line.startswith(b"#")
        if rows and (rows >= limit or (comment and not previous.startswith(b"#"))):
            cuts.append(offset)
            rows, limit = 0, _block_rows(name, len(cuts) - 1)
        # the file's leading comments and column header (lines without a digit) are not rows
        header = header and (blank or comment or not any(48 <= c <= 57 for c in line))
        rows += not (blank or header)
        previous = line
        offset += len(line)
    return cuts


def _block_rows(name: str, block: int) -> int:
    """Rows in block ``block`` of table ``name``: 2 to 512, log-uniform, fixed by CRC-32."""
    return round(2 ** (1 + 8 * zlib.crc32(f"{name}#{block}".encode()) / 2**32))


_SPLITTERS = {"code": _split_code, "prose": _split_prose, "tables": _split_table}


def split_units(domain: str, name: str, data: bytes) -> list[bytes]:
    """The natural units of file ``name`` of ``domain``, in order: together they are ``data``."""
    cuts = [*_SPLITTERS[domain](name, data), len(data)]
    return [data[start:end] for start, end in zip(cuts, cuts[1:])]


def embedded_documents(domain: str) -> list[tuple[str, bytes]]:
    """(name, text) of the documents of ``domain``: files in name order, their units in order.

    A name is the file's and the unit's first line, ``stdlib/json/decoder.py:331``. The list is
    empty when this machine has no file of the domain.
    """
    documents, seen = [], set()
    for name, data in _select(list(_SOURCES[domain]()), DOMAIN_BUDGET_BYTES):
        line = 1
        for unit in split_units(domain, name, data):
            if unit.strip() and unit not in seen:
                seen.add(unit)
                documents.append((f"{name}:{line}", unit))
            line += unit.count(b"\n")
    return documents


_SOURCES = {"code": _code, "prose": _prose, "tables": _tables}
