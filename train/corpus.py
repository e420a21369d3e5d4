"""Corpus readers: a spec string in, an iterator of document strings out.

A spec is one of

- a path to a file, a directory (searched recursively, files in sorted order) or a glob pattern
  (``c4/en/c4-train.*.json.gz``: C4's ``en`` folder also holds its validation files) of
  ``.txt``, ``.jsonl`` or ``.parquet`` files (``.txt.gz``, ``.jsonl.gz`` and C4's ``.json.gz``
  JSON lines too);
- ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face ``datasets`` dataset read in streaming mode,
  e.g. ``hf:allenai/c4:en`` (the seed checkpoint's corpus; split defaults to ``train``);
- ``builtin:python-docs``: the documentation of the Python standard library on the running
  interpreter, rendered with ``pydoc`` (several MB of English, no network needed).

How each format becomes documents:

- ``.txt``: if the file holds WikiText-style article headings (a line `` = Title = ``, one
  ``=`` on each side), every article is a document: the heading line starts it, and its
  section headings (`` = = Section = = ``) stay inside it. Otherwise the whole file is one
  document (a book, an article), unless ``txt_mode="paragraphs"``, where every
  blank-line-separated paragraph is a document (BERT's one-document-per-paragraph format).
  ``txt_mode="file"`` and ``"wikitext"`` force the other two rules.
- ``.jsonl`` (``.json.gz``): one JSON object per line, the document in field ``text`` (``text_field``).
- ``.parquet``: column ``text`` (``text_field``), read in record batches with pyarrow.

A corpus is a list of units read independently (``source_units``): its files, the shards of an
``hf:`` dataset, or the built-in corpus; data preparation makes one output shard per unit.
Documents that are empty after stripping whitespace are skipped. A missing path, a directory
without supported files, or a corpus that yields no document raises a ``ValueError`` naming
the path and what to do.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")  # C4's files: c4-train.00000-of-01024.json.gz
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
TXT_MODES = ("auto", "file", "wikitext", "paragraphs")

# ` = Title = ` starts a WikiText article; ` = = Section = = ` does not.
_WIKITEXT_TITLE_RE = re.compile(r"^ ?= (?!=)[^\n]*[^=\n] = ?$", re.MULTILINE)
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")

# The built-in corpus: the pydoc pages of the standard library's public modules (top-level
# modules from `sys.stdlib_module_names` and their public submodules, in sorted order) plus the
# language-reference topics of `pydoc_data.topics` (what `help("if")` shows). Modules that only
# print or open windows, platform-specific or deprecated ones, tests, and the table-like codec
# modules are left out; one that fails to import on this interpreter is skipped. The corpus
# thus depends only on the Python version.
PYTHON_DOCS_SKIP = (
    "__main__",
    "aifc",
    "antigravity",
    "asynchat",
    "asyncore",
    "audioop",
    "cgi",
    "cgitb",
    "chunk",
    "crypt",
    "curses",
    "distutils",
    "encodings",
    "ensurepip",
    "fcntl",
    "grp",
    "idlelib",
    "imghdr",
    "imp",
    "lib2to3",
    "mailcap",
    "msilib",
    "msvcrt",
    "nis",
    "nntplib",
    "nt",
    "ossaudiodev",
    "pipes",
    "posix",
    "pty",
    "pwd",
    "pydoc_data",
    "readline",
    "resource",
    "smtpd",
    "sndhdr",
    "spwd",
    "sre_compile",
    "sre_constants",
    "sre_parse",
    "sunau",
    "syslog",
    "telnetlib",
    "termios",
    "test",
    "this",
    "tkinter",
    "tty",
    "turtle",
    "turtledemo",
    "uu",
    "venv",
    "winreg",
    "winsound",
    "xdrlib",
)

# Runs in a child interpreter, so that importing a few hundred modules leaves the caller's
# process untouched (no imported state, nothing printed).
_RENDER_PROGRAM = r"""
import contextlib, importlib, io, json, pkgutil, pydoc, sys, warnings
warnings.simplefilter("ignore")
skip, only = json.loads(sys.argv[1])
out = []

def render(name):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = importlib.import_module(name)
            text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    except BaseException:
        return None
    out.append([name, text])
    return module

for top in sorted(sys.stdlib_module_names) if only is None else []:
    if top.startswith("_") or top in skip:
        continue
    module = render(top)
    if module is None or not hasattr(module, "__path__"):
        continue
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            subs = sorted(m.name for m in pkgutil.walk_packages(module.__path__, top + ".", lambda n: None))
    except BaseException:
        subs = []
    for sub in subs:
        parts = sub.split(".")[1:]
        if not any(p.startswith("_") or "test" in p for p in parts):
            render(sub)
for name in only or []:
    render(name)
try:
    from pydoc_data.topics import topics
except ImportError:
    topics = {}
if only is not None:
    topics = {}
for key in sorted(topics):
    out.append(["topic:" + key, topics[key]])
sys.stdout.write(json.dumps(out))
"""

# Dropped: paths and links (FILE, MODULE REFERENCE), constants' reprs, which hold paths of the
# running environment (DATA), and bookkeeping.
_PYDOC_DROP_SECTIONS = ("FILE", "MODULE REFERENCE", "DATA", "VERSION", "AUTHOR", "CREDITS", "DATE")
_INHERITED_RE = re.compile(
    r"^(Methods|Data descriptors|Data and other attributes|Class methods|Static methods|"
    r"Readonly properties|Properties) inherited from "
)
_ENV_PATHS = {
    p: name
    for p, name in (
        (sys.executable, "python"),
        (sys.prefix, "PREFIX"),
        (sys.base_prefix, "PREFIX"),
        (os.path.expanduser("~"), "~"),
    )
    if p and len(p) > 1
}
_MARGIN_RE = re.compile(r"^ *(?:\|(?:  |$))*")  # pydoc's class-body margin "    |  |  "
# Memory addresses vary between runs: "<object at 0x7f...>", "<PyDLL ..., handle 7f...>".
_ADDRESS_RE = re.compile(r"(?: at 0x| handle )[0-9a-fA-F]{8,}\b")


def _clean_pydoc(text: str) -> str:
    """Plain text from pydoc's plaintext page: no margins, paths, addresses, inherited lists."""
    if not text.startswith("Python Library Documentation:"):  # a language-reference topic
        return re.sub(r"\n{3,}", "\n\n", text).strip()
    # Paths of the running environment that appear in signatures' defaults.
    for path, name in sorted(_ENV_PATHS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    lines_out = []
    skipping_section = False
    skipping_inherited = False
    for raw in text.splitlines():
        if raw.startswith("Python Library Documentation:"):
            continue
        if raw and not raw[0].isspace():  # a top-level section heading such as "CLASSES"
            skipping_section = raw.strip() in _PYDOC_DROP_SECTIONS
            skipping_inherited = False
            if skipping_section:
                continue
        if skipping_section:
            continue
        line = _MARGIN_RE.sub("", raw).lstrip()
        if skipping_inherited and raw.strip() and not raw.lstrip(" ").startswith("|"):
            skipping_inherited = False  # left the class body
        if _INHERITED_RE.match(line):
            skipping_inherited = True
            continue
        if line.startswith("-" * 10):
            skipping_inherited = False
            continue
        if skipping_inherited:
            continue
        lines_out.append(_ADDRESS_RE.sub("", line).rstrip())
    cleaned = "\n".join(lines_out)
    return re.sub(r"\n{3,}", "\n\n", cleaned).strip()


@functools.lru_cache(maxsize=4)
def python_docs_corpus(modules: tuple[str, ...] | None = None) -> tuple[tuple[str, str], ...]:
    """(name, text) of every document of the built-in corpus, in a fixed order.

    Rendered once per process in a child interpreter (several seconds), deterministic for a
    given Python version: module pages (name = module) then language-reference topics
    (name = ``topic:KEY``). ``modules`` renders just those modules instead (a small corpus
    for tests).
    """
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONIOENCODING="utf-8")
    request = json.dumps([list(PYTHON_DOCS_SKIP), None if modules is None else list(modules)])
    proc = subprocess.run(
        [sys.executable, "-c", _RENDER_PROGRAM, request],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"rendering the built-in corpus {BUILTIN_PYTHON_DOCS!r} failed "
            f"(exit {proc.returncode}): {proc.stderr[-2000:]}"
        )
    rendered = json.loads(proc.stdout)
    docs = tuple((name, _clean_pydoc(text)) for name, text in rendered)
    return tuple((name, text) for name, text in docs if text)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` -> (name, config or None, split); split defaults to train."""
    if not spec.startswith(HF_PREFIX):
        raise ValueError(f"not a Hugging Face dataset spec: {spec!r}; expected 'hf:NAME[:CONFIG[:SPLIT]]'")
    parts = spec[len(HF_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise ValueError(
            f"bad Hugging Face dataset spec {spec!r}: expected 'hf:NAME[:CONFIG[:SPLIT]]', "
            "e.g. 'hf:allenai/c4:en' or 'hf:wikitext:wikitext-103-raw-v1:validation'"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    return name, config, split


def _hf_dataset(spec: str):
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"reading {spec!r} needs the `datasets` package: pip install 'longformer-jax[data]'") from e
    return datasets.load_dataset(name, config, split=split, streaming=True)


def _read_hf(spec: str, ds, text_field: str) -> Iterator[str]:
    for row in ds:
        if text_field not in row:
            raise ValueError(
                f"dataset {spec!r} has no field {text_field!r} (fields: {sorted(row)}); "
                "pass text_field=... naming the text column"
            )
        yield row[text_field]


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def split_wikitext(text: str) -> list[str]:
    """Articles of a WikiText file: each starts at a `` = Title = `` line (kept in it)."""
    starts = [m.start() for m in _WIKITEXT_TITLE_RE.finditer(text)]
    if not starts:
        return [text]
    pieces = [text[: starts[0]]] + [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]
    return [p.strip() for p in pieces if p.strip()]


def _read_txt(path: str, txt_mode: str) -> Iterator[str]:
    with _open_text(path) as f:
        text = f.read()
    if txt_mode == "paragraphs":
        yield from (p.strip() for p in _BLANK_LINE_RE.split(text) if p.strip())
    elif txt_mode == "wikitext" or (txt_mode == "auto" and _WIKITEXT_TITLE_RE.search(text)):
        yield from split_wikitext(text)
    else:
        yield text.strip()


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({e}); expected one per line") from e
            if not isinstance(row, dict) or text_field not in row:
                raise ValueError(
                    f"{path}:{line_no}: no field {text_field!r}; each line must be a JSON object "
                    f"with the document in {text_field!r} (or pass text_field=...)"
                )
            yield row[text_field]


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
            "pass text_field=... naming the text column"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[") and not os.path.exists(os.path.expanduser(spec))


def _corpus_files(path: str) -> list[str]:
    if _is_pattern(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f) and f.endswith(SUPPORTED_SUFFIXES))
        if not files:
            raise ValueError(
                f"data pattern {path!r} matches no {'/'.join(SUPPORTED_SUFFIXES)} file; check the "
                "pattern (quote it in the shell)"
            )
        return files
    if os.path.isfile(path):
        if not path.endswith(SUPPORTED_SUFFIXES):
            raise ValueError(f"data file {path!r} has an unsupported type; expected one of {SUPPORTED_SUFFIXES}")
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(SUPPORTED_SUFFIXES))
    if not files:
        raise ValueError(
            f"data directory {path!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files; "
            "point --data at a file or directory of documents"
        )
    return files


def _read_file(path: str, txt_mode: str, text_field: str) -> Iterator[str]:
    if path.endswith(TEXT_SUFFIXES):
        return _read_txt(path, txt_mode)
    if path.endswith(JSONL_SUFFIXES):
        return _read_jsonl(path, text_field)
    return _read_parquet(path, text_field)


def _stripped(docs: Iterator[str | None]) -> Iterator[str]:
    """The documents that are not empty after stripping whitespace, stripped."""
    for doc in docs:
        doc = doc.strip() if doc is not None else ""
        if doc:
            yield doc


@dataclasses.dataclass(frozen=True)
class SourceUnit:
    """One independently readable part of a corpus: a file, a dataset shard, the built-in corpus.

    Attributes:
      name: the file's path relative to the corpus root (its name for a single file),
        ``hf:NAME...#shard-I-of-N``, or ``builtin:python-docs@PYTHON_VERSION``.
      size: the file's size in bytes (0 for the others).
      read: returns an iterator of the unit's documents (non-empty, stripped).
    """

    name: str
    size: int
    read: Callable[[], Iterator[str]]


def _check_spec(spec: str, txt_mode: str) -> None:
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode={txt_mode!r} is not one of {TXT_MODES}")
    if spec.startswith("builtin:") and spec != BUILTIN_PYTHON_DOCS:
        raise ValueError(f"unknown built-in corpus {spec!r}; the built-in corpus is {BUILTIN_PYTHON_DOCS!r}")
    if spec.startswith(HF_PREFIX):
        parse_hf_spec(spec)
    elif not spec.startswith("builtin:") and not os.path.exists(os.path.expanduser(spec)) and not _is_pattern(spec):
        raise ValueError(
            f"data path {spec!r} does not exist; pass a .txt/.jsonl/.parquet file or a directory "
            f"of them, 'hf:NAME[:CONFIG]', or {BUILTIN_PYTHON_DOCS!r}"
        )


def source_units(spec: str, *, txt_mode: str = "auto", text_field: str = "text") -> list[SourceUnit]:
    """The units of the corpus ``spec`` in a fixed order: its files (sorted), the shards of a
    streamed ``hf:`` dataset (``n_shards`` of them: its files), or the one built-in corpus.

    Data preparation turns unit ``i`` into output shard ``i``. The spec is checked at once (a
    missing path, an empty file, an unknown format raise a ``ValueError``); documents are read
    lazily.
    """
    spec = str(spec)
    _check_spec(spec, txt_mode)
    if spec == BUILTIN_PYTHON_DOCS:
        name = f"{BUILTIN_PYTHON_DOCS}@{sys.version.split()[0]}"
        return [SourceUnit(name, 0, lambda: _stripped(text for _, text in python_docs_corpus()))]
    if spec.startswith(HF_PREFIX):
        ds = _hf_dataset(spec)
        n = max(1, int(getattr(ds, "n_shards", 1)))
        shard = (lambda i: ds.shard(num_shards=n, index=i)) if n > 1 else (lambda i: ds)
        return [
            SourceUnit(
                f"{spec}#shard-{i}-of-{n}",
                0,
                functools.partial(lambda i: _stripped(_read_hf(spec, shard(i), text_field)), i),
            )
            for i in range(n)
        ]
    path = os.path.expanduser(spec)
    files = _corpus_files(path)
    if all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"data path {spec!r} is empty (0 bytes); point --data at a corpus with text")
    root = path if os.path.isdir(path) else os.path.commonpath([os.path.dirname(f) for f in files])
    return [
        SourceUnit(
            os.path.relpath(f, root),
            os.path.getsize(f),
            functools.partial(lambda f: _stripped(_read_file(f, txt_mode, text_field)), f),
        )
        for f in files
    ]


def read_documents(
    spec: str,
    *,
    txt_mode: str = "auto",
    text_field: str = "text",
) -> Iterator[str]:
    """Documents (non-empty, stripped strings) of the corpus ``spec``, unit after unit (``source_units``).

    The spec is checked at once (a missing path, an empty file, an unknown format raise a
    ``ValueError`` here); the documents are read lazily. A corpus that turns out to hold no
    text raises a ``ValueError`` when the iterator is exhausted.
    """
    units = source_units(spec, txt_mode=txt_mode, text_field=text_field)

    def docs() -> Iterator[str]:
        n = 0
        for unit in units:
            for doc in unit.read():
                n += 1
                yield doc
        if n == 0:
            raise ValueError(f"data {spec!r} holds no text (every document is empty); point --data at a corpus")

    return docs()
