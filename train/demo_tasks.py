"""Small offline fine-tuning tasks built from real text: the one home of their rules and their format.

``python -m train.demo_tasks --output DIR [--task NAME ...] [--seed 42] [--wikitext PATH]`` writes,
for each task, ``DIR/<task>/{train,validation,test}.jsonl``, ``labels.txt`` (tasks with named
labels), ``README.md`` (the labelling rule, the split rule and the counts) and ``task.json`` (the
same facts for programs). The benchmark sets of the Longformer literature (LexGLUE, ContractNLI,
QuALITY, MIMIC) cannot be downloaded offline; these tasks are made from text that ships with
Python (the built-in corpus of :func:`train.corpus.python_docs_corpus`) or lies in
``../shared/data/wikitext-2/``, with labels from rules anyone can check, on long documents.

Tasks (``TASK_NAMES``):

- ``document-classification``: a standard-library module's pydoc page -> the chapter of the
  Python Library Reference that documents the module (``LIBRARY_CHAPTERS``, from the chapter list
  of https://docs.python.org/3.11/library/index.html). Pages under ``min_words`` words and
  chapters with fewer than ``min_pages`` pages are left out.
- ``sequential-sentence-classification``: the blocks of a pydoc page -> the pydoc section they
  fall in (``NAME``, ``DESCRIPTION``, ``PACKAGE CONTENTS``, ``CLASSES``, ``FUNCTIONS``; section
  headings removed from the text). A block is a blank-line-separated paragraph; one longer than
  ``max_block_words`` words is cut at sentence ends into pieces of at most that many words.
- ``multiple-choice``: a window of a WikiText-2 article with one sentence cut out and
  ``MASK`` (``"<mask>"``, RoBERTa's mask token, which is also the demo tokenizer's) in its place;
  four candidates of about the same length: the cut sentence, one sentence of the same article
  from outside the window (if the article has one of about the right length), and two (or three)
  sentences of other articles of the same split.
- ``question-answering``: a pydoc page; the question is the first sentence of the docstring of
  one of its module-level functions (a sentence that occurs once in the page), the answer is that
  function's name where its entry starts. A lookup task over a long page (the question occurs
  verbatim in the context): it checks the extractive head and its global attention on the
  question, not reading comprehension.

Format: one JSON object per line. Every record has ``id`` (unique in the task) and ``document``
(the page or article it comes from; no document is in two splits), and

- document classification: ``text`` (a string), ``label`` (a string, one line of ``labels.txt``);
- sequential sentence classification: ``text`` (a list of strings, the blocks in page order) and
  ``labels`` (a list of strings, one per block);
- multiple choice: ``text`` (the context, a string holding ``MASK`` once), ``choices`` (a list of
  ``NUM_CHOICES`` strings) and ``label`` (the index of the true choice);
- question answering: ``text`` (the context), ``question``, ``answer`` and ``answer_start`` (the
  character offset of the answer in ``text``: ``text[answer_start:][:len(answer)] == answer``).

Splits hold out whole documents (``split_documents``): each document goes to one split, drawn
from the seed; document classification draws per label, so every split holds every label.
Everything is deterministic for a given seed and Python version (the pydoc pages depend on it).
From Python: ``build_tasks(output, tasks, seed, wikitext, docs=..., options={task: {...}})``, or
one builder per task (``document_classification(docs, seed)`` ...) returning a ``Task``.
``python -m bench.finetune_baselines DIR`` scores bag-of-words baselines on the written tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from train.corpus import python_docs_corpus, split_wikitext
from train.sentences import split_sentences

TASK_NAMES = (
    "document-classification",
    "sequential-sentence-classification",
    "multiple-choice",
    "question-answering",
)
SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.15  # of the documents (of each label, where splits are drawn per label), per held-out split
MASK = "<mask>"
NUM_CHOICES = 4
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WIKITEXT = os.path.join(REPO_ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
_MARKER = "train.demo_tasks"

# The chapters of the Python 3.11 Library Reference (https://docs.python.org/3.11/library/index.html)
# and the modules each chapter's table of contents lists. A page's label is the chapter of its module
# or of the module's closest listed parent package (asyncio.locks -> asyncio). The introduction,
# built-ins, Tk, Windows, Unix and undocumented chapters list no page of the built-in corpus.
LIBRARY_CHAPTERS = {
    "Text Processing Services": "string re difflib textwrap unicodedata stringprep readline rlcompleter",
    "Binary Data Services": "struct codecs",
    "Data Types": "datetime zoneinfo calendar collections collections.abc heapq bisect array weakref types copy "
    "pprint reprlib enum graphlib",
    "Numeric and Mathematical Modules": "numbers math cmath decimal fractions random statistics",
    "Functional Programming Modules": "itertools functools operator",
    "File and Directory Access": "pathlib os.path posixpath ntpath genericpath fileinput stat filecmp tempfile "
    "glob fnmatch linecache shutil",
    "Data Persistence": "pickle copyreg shelve marshal dbm sqlite3",
    "Data Compression and Archiving": "zlib gzip bz2 lzma zipfile tarfile",
    "File Formats": "csv configparser tomllib netrc plistlib",
    "Cryptographic Services": "hashlib hmac secrets",
    "Generic Operating System Services": "os io time argparse getopt logging logging.config logging.handlers "
    "getpass curses platform errno ctypes",
    "Concurrent Execution": "threading multiprocessing multiprocessing.shared_memory concurrent "
    "concurrent.futures subprocess sched queue contextvars _thread",
    "Networking and Interprocess Communication": "asyncio socket ssl select selectors signal mmap",
    "Internet Data Handling": "email json mailbox mimetypes base64 binascii quopri",
    "Structured Markup Processing Tools": "html html.parser html.entities xml xml.etree.ElementTree xml.dom "
    "xml.dom.minidom xml.dom.pulldom xml.sax xml.sax.handler "
    "xml.sax.saxutils xml.sax.xmlreader xml.parsers.expat",
    "Internet Protocols and Support": "webbrowser wsgiref urllib urllib.request urllib.response urllib.parse "
    "urllib.error urllib.robotparser http http.client ftplib poplib imaplib "
    "smtplib uuid socketserver http.server http.cookies http.cookiejar xmlrpc "
    "xmlrpc.client xmlrpc.server ipaddress",
    "Multimedia Services": "wave colorsys",
    "Internationalization": "gettext locale",
    "Program Frameworks": "turtle cmd shlex",
    "Development Tools": "typing pydoc doctest unittest unittest.mock lib2to3 test",
    "Debugging and Profiling": "bdb faulthandler pdb profile cProfile pstats timeit trace tracemalloc",
    "Software Packaging and Distribution": "distutils ensurepip venv zipapp",
    "Python Runtime Services": "sys sysconfig builtins __main__ warnings dataclasses contextlib abc atexit "
    "traceback __future__ gc inspect site",
    "Custom Python Interpreters": "code codeop",
    "Importing Modules": "zipimport pkgutil modulefinder runpy importlib importlib.resources "
    "importlib.resources.abc importlib.metadata",
    "Python Language Services": "ast symtable token keyword tokenize tabnanny pyclbr py_compile compileall dis "
    "pickletools",
    "Superseded Modules": "optparse imp",
}
_MODULE_CHAPTER = {m: chapter for chapter, mods in LIBRARY_CHAPTERS.items() for m in mods.split()}

# pydoc's section headings that `_clean_pydoc` keeps, in page order; SUBMODULES (3 blocks in the
# whole corpus, a list of submodule names like PACKAGE CONTENTS) is counted as PACKAGE CONTENTS.
PYDOC_SECTIONS = ("NAME", "DESCRIPTION", "PACKAGE CONTENTS", "CLASSES", "FUNCTIONS")
_SECTION_ALIASES = {"SUBMODULES": "PACKAGE CONTENTS"}
_HEADINGS = set(PYDOC_SECTIONS) | set(_SECTION_ALIASES)
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")
_FUNCTION_ENTRY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\(")
# A WikiText sentence that can be cut or serve as a distractor: one line, a capital first, WikiText's
# spaced final punctuation last (so no abbreviation cut it short).
_WIKITEXT_SENTENCE_RE = re.compile(r"[A-Z][^\n]* [.!?]")


@dataclass
class Task:
    """A built task: its records per split, its label names (or None) and its README."""

    name: str
    splits: dict[str, list[dict]]
    labels: list[str] | None
    rule: str  # the README's paragraphs on the labelling and the split rule (markdown)


def library_chapter(module: str) -> str | None:
    """The Library Reference chapter of ``module`` (or of its closest listed parent package)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        chapter = _MODULE_CHAPTER.get(".".join(parts[:i]))
        if chapter is not None:
            return chapter
    return None


def pydoc_sections(page: str) -> list[tuple[str, str]]:
    """(section, body) pairs of a cleaned pydoc page, in order; the heading lines are not in the bodies.

    A heading is a line that is exactly a pydoc section title at the start of the page or after a
    blank line. A page that does not start with ``NAME`` (a language-reference topic) has none: [].
    """
    lines = page.split("\n")
    if not lines or lines[0] != "NAME":
        return []
    sections: list[tuple[str, list[str]]] = []
    for i, line in enumerate(lines):
        if line in _HEADINGS and (i == 0 or not lines[i - 1].strip()):
            sections.append((_SECTION_ALIASES.get(line, line), []))
        else:
            sections[-1][1].append(line)
    return [(name, "\n".join(body).strip()) for name, body in sections]


def split_documents(
    documents: Sequence[str], seed: int, salt: str, fraction: float = HELD_OUT_FRACTION
) -> dict[str, str]:
    """Document -> split: a seeded shuffle; ``max(1, round(fraction * n))`` each to validation and test.

    Needs at least 3 documents (one per split). The shuffle depends only on the seed, ``salt`` and
    the set of documents (they are sorted first), not on their order.
    """
    docs = sorted(set(documents))
    if len(docs) < 3:
        raise ValueError(f"{salt}: {len(docs)} documents cannot make 3 splits; give at least 3")
    random.Random(f"{seed}:{salt}").shuffle(docs)
    n_held = max(1, round(fraction * len(docs)))
    if 2 * n_held >= len(docs):
        n_held = (len(docs) - 1) // 2
    split = {d: "validation" for d in docs[:n_held]}
    split.update({d: "test" for d in docs[n_held : 2 * n_held]})
    split.update({d: "train" for d in docs[2 * n_held :]})
    return split


def _by_split(records: Iterable[dict], doc_split: dict[str, str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in records:
        out[doc_split[r["document"]]].append(r)
    return out


def _words(text: str) -> int:
    return len(text.split())


def document_classification(
    docs: Sequence[tuple[str, str]], seed: int = 42, *, min_words: int = 100, min_pages: int = 10
) -> Task:
    """Module pages labelled by their Library Reference chapter; splits drawn per chapter."""
    if min_pages < 3:
        raise ValueError(f"min_pages={min_pages}: every chapter needs at least 3 pages (one per split)")
    pages = [
        (name, text, library_chapter(name))
        for name, text in docs
        if not name.startswith("topic:") and _words(text) >= min_words
    ]
    counts = Counter(chapter for _, _, chapter in pages if chapter is not None)
    kept = [c for c in LIBRARY_CHAPTERS if counts[c] >= min_pages]
    if len(kept) < 2:
        raise ValueError(
            f"document-classification: only {len(kept)} chapter(s) have {min_pages}+ pages of {min_words}+ words "
            f"among {len(docs)} documents; pass more pages or lower min_pages/min_words"
        )
    doc_split: dict[str, str] = {}
    for chapter in kept:
        doc_split.update(split_documents([n for n, _, c in pages if c == chapter], seed, f"doc-class:{chapter}"))
    records = [
        {"id": name, "document": name, "text": text, "label": chapter}
        for name, text, chapter in pages
        if chapter in kept
    ]
    dropped = sorted(c for c in counts if c not in kept)
    rule = (
        "**Label.** The chapter of the Python Library Reference "
        "(https://docs.python.org/3.11/library/index.html) whose table of contents lists the page's module, "
        "or its closest listed parent package (`asyncio.locks` -> `asyncio` -> *Networking and Interprocess "
        "Communication*); the table is `LIBRARY_CHAPTERS` in `train/demo_tasks.py`.\n\n"
        f"**Documents.** The pydoc pages of the built-in corpus (`builtin:python-docs`) with at least {min_words} "
        f"words, in chapters with at least {min_pages} such pages. Left out: language-reference topics, "
        f"unlisted modules, and the chapters with fewer pages ({', '.join(dropped) or 'none'}).\n\n"
        "**Why this label.** It is a property of the whole page that the page does not state (the chapter name "
        "is not in the text), it takes a reader's knowledge of what the module is for, the classes are "
        "balanced enough (the largest is a few times the smallest, not 80%), and the documents are long "
        "(hundreds to thousands of words). The top-level package would be trivial (the page's first line "
        "names it). Sibling pages of one package (`asyncio.locks`, `asyncio.tasks`) may fall in different "
        "splits: the unit held out is the page.\n\n"
        f"**Split.** Per chapter, the pages are shuffled with the seed and {HELD_OUT_FRACTION:.0%} (at least one) "
        "go to validation, as many to test, the rest to train."
    )
    return Task("document-classification", _by_split(records, doc_split), kept, rule)


def _blocks(body: str, max_words: int) -> list[str]:
    """Paragraphs of ``body``; one over ``max_words`` words is cut at sentence ends (greedily)."""
    blocks = []
    for para in _PARAGRAPH_RE.split(body):
        para = para.strip()
        if not para:
            continue
        if _words(para) <= max_words:
            blocks.append(para)
            continue
        current = ""
        for sentence in split_sentences(para):
            if current and _words(current) + _words(sentence) > max_words:
                blocks.append(current.strip())
                current = ""
            current += sentence
        if current.strip():
            blocks.append(current.strip())
    return blocks


def sequential_sentence_classification(
    docs: Sequence[tuple[str, str]], seed: int = 42, *, max_block_words: int = 100, min_blocks: int = 4
) -> Task:
    """The blocks of every module page with 2+ sections and ``min_blocks``+ blocks, labelled by pydoc section."""
    records = []
    for name, text in docs:
        sections = pydoc_sections(text)
        if len(sections) < 2:
            continue
        blocks, labels = [], []
        for section, body in sections:
            for block in _blocks(body, max_block_words):
                blocks.append(block)
                labels.append(section)
        if len(blocks) < min_blocks:
            continue
        records.append({"id": name, "document": name, "text": blocks, "labels": labels})
    if len(records) < 3:
        raise ValueError(
            f"sequential-sentence-classification: {len(records)} module pages with 2+ pydoc sections and "
            f"{min_blocks}+ blocks among the documents; give at least 3"
        )
    doc_split = split_documents([r["document"] for r in records], seed, "sequential-sentence-classification")
    rule = (
        "**Labels.** One per block: the pydoc section the block falls in (`python -m pydoc MODULE` shows the "
        f"headings): {', '.join(PYDOC_SECTIONS)} (SUBMODULES counted as PACKAGE CONTENTS). The heading lines "
        "themselves are removed from the text, so a block's label comes from what it says and where it is: "
        "a method's entry (CLASSES) and a function's entry (FUNCTIONS) look alike, the page's order tells them "
        "apart.\n\n"
        "**Blocks.** The blank-line-separated paragraphs of the cleaned page (the built-in corpus's text); a "
        f"paragraph longer than {max_block_words} words is cut at sentence ends (`train.sentences.split_sentences`) "
        f"into pieces of at most {max_block_words} words. Sections DATA, FILE and the like are not in the "
        "corpus.\n\n"
        f"**Documents.** Every module page of the built-in corpus with at least two sections and {min_blocks} "
        "blocks.\n\n"
        f"**Split.** Pages shuffled with the seed; {HELD_OUT_FRACTION:.0%} (at least one) to validation, as many "
        "to test, the rest to train."
    )
    return Task("sequential-sentence-classification", _by_split(records, doc_split), list(PYDOC_SECTIONS), rule)


def _function_entries(page: str) -> list[tuple[str, int, str]]:
    """(name, start, first docstring sentence) of the entries of the FUNCTIONS section of a page."""
    match = re.search(r"(?:^|\n\n)FUNCTIONS\n", page)
    if match is None:
        return []
    start = match.end()
    end = len(page)
    for heading in PYDOC_SECTIONS:
        later = page.find(f"\n\n{heading}\n", start)
        if later != -1:
            end = min(end, later)
    entries = []
    offset = start
    for para in page[start:end].split("\n\n"):
        lines = para.split("\n")
        entry = _FUNCTION_ENTRY_RE.match(lines[0])
        if entry is not None and len(lines) > 1 and lines[1].strip():
            sentences = split_sentences("\n".join(lines[1:]))
            first = " ".join(sentences[0].split()) if sentences else ""
            entries.append((entry.group(1), offset, first))
        offset += len(para) + 2
    return entries


def question_answering(
    docs: Sequence[tuple[str, str]],
    seed: int = 42,
    *,
    min_question_words: int = 6,
    max_per_page: int = 10,
    min_words: int = 100,
) -> Task:
    """Questions from the module-level functions' docstrings; the answer is the function's name."""
    records = []
    for name, text in docs:
        if _words(text) < min_words:
            continue
        entries = _function_entries(text)
        flat = " ".join(text.split())
        names = Counter(n for n, _, _ in entries)
        usable = [
            (fn, start, q)
            for fn, start, q in entries
            if names[fn] == 1 and _words(q) >= min_question_words and flat.count(q) == 1
        ]
        random.Random(f"{seed}:question-answering:{name}").shuffle(usable)
        for fn, start, question in sorted(usable[:max_per_page], key=lambda e: e[1]):
            records.append(
                {
                    "id": f"{name}#{fn}",
                    "document": name,
                    "text": text,
                    "question": question,
                    "answer": fn,
                    "answer_start": start,
                }
            )
    if len({r["document"] for r in records}) < 3:
        raise ValueError("question-answering: fewer than 3 pages with usable function entries; give more pages")
    doc_split = split_documents([r["document"] for r in records], seed, "question-answering")
    rule = (
        "**Question and answer.** For a module-level function of a pydoc page (an entry of its FUNCTIONS "
        "section: `name(signature)` followed by its docstring), the question is the docstring's first sentence "
        "(`train.sentences.split_sentences`, whitespace collapsed), the answer is the function's name at the start "
        "of its entry; `answer_start` is its character offset in `text` (the whole page). Kept: questions of "
        f"{min_question_words}+ words that occur once in the page (whitespace collapsed) and names with one "
        f"entry; at most {max_per_page} per page, drawn with the seed, from pages of {min_words}+ words.\n\n"
        "**What it measures.** The question occurs verbatim in the page, so this is a lookup over a long "
        "context (find the entry, return the name that heads it): a check that the extractive head and its "
        "global attention on the question learn, not reading comprehension.\n\n"
        f"**Split.** Pages shuffled with the seed; {HELD_OUT_FRACTION:.0%} (at least one) to validation, as many "
        "to test, the rest to train."
    )
    return Task("question-answering", _by_split(records, doc_split), None, rule)


@dataclass
class _Article:
    title: str  # the heading line without its `=` signs (a repeated title gets its rank: `T (2)`)
    heading: str  # the heading line, ` = Title = ` stripped
    pieces: list[str]  # split_sentences of the body: joined, they give the body back
    eligible: list[int]  # indices of the pieces that may be cut or serve as distractors


def _wikitext_articles(text: str) -> list[_Article]:
    articles = []
    for article in split_wikitext(text):
        heading, _, body = article.partition("\n")
        pieces = split_sentences(body)
        eligible = [
            i for i, p in enumerate(pieces) if _WIKITEXT_SENTENCE_RE.fullmatch(p.strip()) and 8 <= _words(p) <= 60
        ]
        articles.append(_Article(heading.strip().strip("=").strip(), heading.strip(), pieces, eligible))
    seen: Counter = Counter()
    for art in articles:  # a repeated title (WikiText's `<unk> <unk>`) gets its rank: `T`, `T (2)`, ...
        seen[art.title] += 1
        if seen[art.title] > 1:
            art.title = f"{art.title} ({seen[art.title]})"
    return articles


def _window(article: _Article, gap: int, context_words: int) -> tuple[int, int]:
    """[a, b): sentences around ``gap`` (growing on both sides in turn) up to ``context_words`` words."""
    a, b = gap, gap + 1
    words = _words(article.pieces[gap])
    while words < context_words and (a > 0 or b < len(article.pieces)):
        for side in (0, 1):
            if side == 0 and a > 0:
                a -= 1
                words += _words(article.pieces[a])
            elif side == 1 and b < len(article.pieces):
                words += _words(article.pieces[b])
                b += 1
    return a, b


def _length_matched(
    pool: list[tuple[int, str]], n_words: int, k: int, rng: random.Random, strict: bool = False
) -> list[str]:
    """``k`` sentences of ``pool`` ((words, sentence) pairs) drawn among those within 10% (at least 1 word)
    of ``n_words`` words; the nearest lengths fill in when too few are that close (unless ``strict``)."""
    tol = max(1, round(0.1 * n_words))
    close = [s for n, s in pool if abs(n - n_words) <= tol]
    if len(close) >= k or strict:
        return rng.sample(close, min(k, len(close)))
    rest = sorted((abs(n - n_words), s) for n, s in pool if abs(n - n_words) > tol)
    return close + [s for _, s in rest[: k - len(close)]]


def _mc_records(
    articles: list[_Article], split_of: dict[str, str], seed: int, per_article: int, context_words: int
) -> list[dict]:
    sentences = {a.title: [(_words(a.pieces[i]), a.pieces[i].strip()) for i in a.eligible] for a in articles}
    records = []
    for art in articles:
        rng = random.Random(f"{seed}:multiple-choice:{art.title}")
        others = [
            pair
            for a in articles
            if a.title != art.title and split_of[a.title] == split_of[art.title]
            for pair in sentences[a.title]
        ]
        for gap in sorted(rng.sample(art.eligible, min(per_article, len(art.eligible)))):
            a, b = _window(art, gap, context_words)
            true = art.pieces[gap].strip()
            lead = art.pieces[gap][: len(art.pieces[gap]) - len(art.pieces[gap].lstrip())]
            body = "".join(art.pieces[a:gap]) + lead + MASK + "".join(art.pieces[gap + 1 : b])
            context = art.heading + "\n" + body.strip()
            same = [pair for i, pair in zip(art.eligible, sentences[art.title]) if not a <= i < b and pair[1] != true]
            n = _words(true)
            distractors = _length_matched(same, n, 1, rng, strict=True)
            pool = [pair for pair in others if pair[1] != true]
            distractors += _length_matched(pool, n, NUM_CHOICES - 1 - len(distractors), rng)
            if len(set(distractors)) < NUM_CHOICES - 1:  # pools too small (a tiny corpus): no example here
                continue
            label = rng.randrange(NUM_CHOICES)
            choices = distractors[:label] + [true] + distractors[label:]
            records.append(
                {"id": f"{art.title}#{gap}", "document": art.title, "text": context, "choices": choices, "label": label}
            )
    return records


def multiple_choice(wikitext: str, seed: int = 42, *, per_article: int = 100, context_words: int = 1024) -> Task:
    """Cut-sentence multiple choice on the articles of a WikiText file (the file's text)."""
    articles = [a for a in _wikitext_articles(wikitext) if len(a.eligible) >= 2]
    if len(articles) < 3:
        raise ValueError(
            f"multiple-choice: {len(articles)} WikiText articles with 2+ usable sentences; need at least 3 "
            "(a WikiText file: ` = Title = ` lines start the articles)"
        )
    titles = [a.title for a in articles]
    split_of = split_documents(titles, seed, "multiple-choice")
    records = _mc_records(articles, split_of, seed, per_article, context_words)
    empty = [s for s in SPLITS if not any(split_of[r["document"]] == s for r in records)]
    if empty:
        raise ValueError(
            f"multiple-choice: no example in split(s) {empty}: {len(articles)} articles leave too few per split "
            "for distractors from other articles; give a WikiText file with more articles"
        )
    rule = (
        f"**Example.** From a WikiText-2 article, one sentence is cut and `{MASK}` (RoBERTa's mask token, also "
        "the demo tokenizer's) put in its place. `text` is the article's title line and a window of about "
        f"{context_words} words of the article around the gap (whole sentences; the gap is in the middle "
        "unless the article's start or end is near), so a program that keeps fewer tokens should cut both ends "
        f"and keep `{MASK}`. `choices` holds {NUM_CHOICES} sentences: the cut one (`label` is its index, drawn "
        "uniformly with the seed), one sentence of the same article from outside the window (never a sentence "
        "of the context; where the article has no such sentence of about the right length, a third sentence "
        "of another article), and two sentences of other articles of the same split. Every candidate has about the "
        "same length as the true one (within 10%, at least 1 word, where the pool allows), so length does not "
        "give the answer.\n\n"
        "**Why these distractors.** The two from other articles can be ruled out by topic (learnable in a few "
        "minutes); the one from the same article takes local coherence with the sentences around the gap. A "
        "topic-only model stops near 50%, chance is 25%.\n\n"
        "**Sentences.** `train.sentences.split_sentences` pieces of one line that start with a capital letter, end "
        f"with WikiText's spaced ` .`, ` ?` or ` !` (so no abbreviation cut them short) and have 8-60 words; at "
        f"most {per_article} gaps per article, drawn with the seed.\n\n"
        f"**Split.** Articles shuffled with the seed; {HELD_OUT_FRACTION:.0%} (at least one) to validation, as many "
        "to test, the rest to train. Distractors come from the example's own split only."
    )
    return Task("multiple-choice", _by_split(records, split_of), None, rule)


def _summary(task: Task) -> tuple[str, dict]:
    """The README's counts table (markdown) and the same counts for task.json."""
    counts = {}
    head = "| split | documents | examples | words per example (min / median / max) |"
    lines = [head + (" labels |" if task.labels else ""), "|---|---:|---:|---:|" + ("---|" if task.labels else "")]
    for split in SPLITS:
        records = task.splits[split]
        words = sorted(_words(" ".join(r["text"]) if isinstance(r["text"], list) else r["text"]) for r in records)
        per_label: Counter = Counter()
        for r in records:
            if "labels" in r:
                per_label.update(r["labels"])
            elif task.labels:
                per_label[r["label"]] += 1
        entry = {"documents": len({r["document"] for r in records}), "examples": len(records)}
        if words:
            entry["words"] = {"min": words[0], "median": words[len(words) // 2], "max": words[-1]}
        row = f"| {split} | {entry['documents']} | {len(records)} | "
        row += " / ".join(str(v) for v in entry["words"].values()) + " |" if words else " |"
        if any("labels" in r for r in records):
            entry["blocks"] = sum(len(r["labels"]) for r in records)
        if task.labels:
            entry["labels"] = {label: per_label[label] for label in task.labels}
            label_text = ", ".join(f"{label} {per_label[label]}" for label in task.labels)
            row += f" {entry['blocks']} blocks: {label_text} |" if "blocks" in entry else f" {label_text} |"
        counts[split] = entry
        lines.append(row)
    return "\n".join(lines), counts


def write_task(task: Task, output: str, seed: int) -> str:
    """Writes ``output/<task>/`` (replacing an earlier build of this program, atomically); returns its path."""
    final = os.path.join(output, task.name)
    if os.path.exists(final) and not os.path.isfile(os.path.join(final, "task.json")):
        raise ValueError(
            f"{final} exists and was not written by `python -m {_MARKER}` (no task.json); "
            "remove it or choose another --output"
        )
    tmp = os.path.join(output, f".{task.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for split in SPLITS:
            with open(os.path.join(tmp, f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for record in task.splits[split]:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if task.labels:
            with open(os.path.join(tmp, "labels.txt"), "w", encoding="utf-8") as f:
                f.write("".join(label + "\n" for label in task.labels))
        table, counts = _summary(task)
        readme = (
            f"# {task.name}\n\nBuilt by `python -m {_MARKER} --task {task.name} --seed {seed}` "
            "(the record format is in that module's docstring).\n\n"
            f"{task.rule}\n\n**Counts** (seed {seed}):\n\n{table}\n"
        )
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)
        meta = {"task": task.name, "builder": _MARKER, "seed": seed, "labels": task.labels, "splits": counts}
        with open(os.path.join(tmp, "task.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_wikitext(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"multiple-choice needs WikiText-2's valid.txt, not found at {path}; pass --wikitext PATH "
            "(a WikiText file) or leave the task out"
        )
    with open(path, encoding="utf-8") as f:
        return f.read()


def build_tasks(
    output: str,
    tasks: Sequence[str] | None = None,
    seed: int = 42,
    wikitext: str = DEFAULT_WIKITEXT,
    docs: Sequence[tuple[str, str]] | None = None,
    options: dict[str, dict] | None = None,
) -> dict[str, str]:
    """Builds and writes the named tasks (all when None); returns task -> directory.

    ``docs`` replaces the built-in corpus (``python_docs_corpus()``) for the pydoc tasks; ``options``
    maps a task name to keyword arguments of its builder (e.g. ``{"multiple-choice":
    {"per_article": 5}}``). With
    ``tasks=None`` a missing WikiText file skips ``multiple-choice`` with a message on stderr;
    naming the task makes it a ``FileNotFoundError``.
    """
    unknown = [t for t in [*(tasks or ()), *(options or {})] if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASK_NAMES)}")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a file; pass a directory")
    chosen = list(dict.fromkeys(tasks)) if tasks else list(TASK_NAMES)
    written = {}
    for name in chosen:
        if name == "multiple-choice":
            try:
                text = _read_wikitext(wikitext)
            except FileNotFoundError as e:
                if tasks:
                    raise
                print(f"skipping multiple-choice: {e}", file=sys.stderr)
                continue
            task = multiple_choice(text, seed, **(options or {}).get(name, {}))
        else:
            if docs is None:
                docs = python_docs_corpus()
            builder = {
                "document-classification": document_classification,
                "sequential-sentence-classification": sequential_sentence_classification,
                "question-answering": question_answering,
            }[name]
            task = builder(docs, seed, **(options or {}).get(name, {}))
        written[name] = write_task(task, output, seed)
        sizes = ", ".join(f"{s} {len(task.splits[s])}" for s in SPLITS)
        print(f"wrote {written[name]}: {sizes}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.demo_tasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="directory that receives one folder per task")
    p.add_argument("--task", action="append", choices=TASK_NAMES, help="a task to build (repeatable; default: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the splits and the draws (default 42)")
    p.add_argument(
        "--wikitext",
        default=DEFAULT_WIKITEXT,
        help="WikiText file for multiple-choice (default: ../shared/data/wikitext-2/valid.txt)",
    )
    args = p.parse_args(argv)
    try:
        build_tasks(args.output, args.task, args.seed, args.wikitext)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
