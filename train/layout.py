"""Document layout: documents in, fixed-length example arrays out.

The one home of how a document becomes model input, for pretraining and fine-tuning alike.
Functions of text, token ids and a few sizes (a tokenizer enters only as an ``encode``
callable; no I/O), so data preparation, the training input pipeline and a fine-tuning reader all
call the same code. Two layouts:

- ``"blocks"`` (the seed checkpoint's): a document is split into sentences
  (``train.sentences.split_sentences``, NLTK's English Punkt, as the seed's authors did), the
  sentences' tokens are grouped greedily into blocks of at most ``block_size - 1`` tokens
  (``group_blocks``; a sentence longer than that is cut into pieces), and ``seq_len //
  block_size`` blocks make an example (``blocks_example``): each block starts with ``</s>``
  (the first with ``<s>``), is padded with ``<pad>`` to ``block_size`` inside the sequence
  (attention mask 0 there), and has global attention on its start. Blocks an example does not
  fill are all padding. ``document_blocks`` cuts one document into examples' blocks.
- ``"contiguous"``: documents, each followed by ``</s>``, are joined into one stream and cut
  into examples of ``<s>`` + ``seq_len - 1`` tokens (``contiguous_chunks``): no padding, no
  global attention.

An example is stored compactly as its content tokens (no block starts, no padding) and, for the
blocks layout, its block lengths; ``expand_blocks`` / ``expand_contiguous`` rebuild the arrays
exactly. Every example is a dict of ``input_ids``, ``attention_mask``, ``global_attention_mask``:
int32 arrays of shape (seq_len,).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from longformer_jax.sentences import split_sentences
from longformer_jax.text_layout import blocks_example, group_blocks
from longformer_jax.text_layout import expand_blocks as expand_blocks  # re-exported for train.records

LAYOUTS = ("blocks", "contiguous")
MODEL_KEYS = ("input_ids", "attention_mask", "global_attention_mask")

Example = dict[str, np.ndarray]
Blocks = list[list[int]]  # the blocks of one example, each a list of token ids


def check_layout(layout: str, seq_len: int, block_size: int, min_blocks: int = 1) -> None:
    """Raises a ``ValueError`` naming the fix when the sizes make no example of ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short; use e.g. 512 or 4096")
    if layout != "blocks":
        return
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be at least 2 (a block start and a token); the seed uses 128")
    if seq_len % block_size:
        raise ValueError(
            f"seq_len={seq_len} is not a multiple of block_size={block_size}; "
            f"use seq_len={max(1, seq_len // block_size) * block_size} or another block size"
        )
    n_blocks = seq_len // block_size
    if not 1 <= min_blocks <= n_blocks:
        raise ValueError(f"min_blocks={min_blocks} must lie in [1, {n_blocks}] (blocks per example)")


def document_blocks(
    sentences: Iterable[Sequence[int]], *, seq_len: int, block_size: int, min_blocks: int = 1
) -> list[Blocks]:
    """The ``"blocks"`` examples of one document (its sentences as token id lists), each as its blocks.

    A long document makes several examples; an example (in practice the last) with fewer than
    ``min_blocks`` blocks is dropped.
    """
    blocks = group_blocks(sentences, block_size - 1)
    n_blocks = seq_len // block_size
    chunks = (blocks[i : i + n_blocks] for i in range(0, len(blocks), n_blocks))
    return [chunk for chunk in chunks if len(chunk) >= min_blocks]


def sentence_ids(text: str, encode: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
    """The token ids of each sentence of ``text`` (``split_sentences``), by ``encode``."""
    return encode(split_sentences(text))


def document_blocks_examples(
    sentences: Iterable[Sequence[int]],
    *,
    seq_len: int,
    block_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    min_blocks: int = 1,
) -> list[Example]:
    """The ``"blocks"`` examples of one document, given its sentences as token id lists, as arrays."""
    return [
        blocks_example(chunk, seq_len=seq_len, block_size=block_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
        for chunk in document_blocks(sentences, seq_len=seq_len, block_size=block_size, min_blocks=min_blocks)
    ]


def expand_contiguous(tokens: np.ndarray, *, bos_id: int) -> Example:
    """A ``"contiguous"`` example from its ``seq_len - 1`` tokens after ``<s>``."""
    input_ids = np.empty((len(tokens) + 1,), np.int32)
    input_ids[0] = bos_id
    input_ids[1:] = tokens
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "global_attention_mask": np.zeros_like(input_ids),
    }


class ContiguousStream:
    """The ``"contiguous"`` layout over documents given one at a time.

    ``add(tokens)`` appends a document and ``</s>`` to the stream and returns the chunks of
    ``seq_len - 1`` tokens completed by it (each becomes ``<s>`` + chunk); tokens left at the end
    (fewer than one example) are dropped.
    """

    def __init__(self, *, seq_len: int, eos_id: int):
        self.span, self.eos_id = seq_len - 1, eos_id
        self._stream: list[int] = []

    def add(self, tokens: Sequence[int]) -> list[list[int]]:
        self._stream.extend(tokens)
        self._stream.append(self.eos_id)
        n_full = len(self._stream) // self.span
        chunks = [self._stream[i * self.span : (i + 1) * self.span] for i in range(n_full)]
        del self._stream[: n_full * self.span]
        return chunks


def contiguous_examples(
    documents: Iterable[Sequence[int]], *, seq_len: int, bos_id: int, eos_id: int
) -> Iterator[Example]:
    """The ``"contiguous"`` examples of a stream of documents (token id lists), as arrays."""
    stream = ContiguousStream(seq_len=seq_len, eos_id=eos_id)
    for tokens in documents:
        for chunk in stream.add(tokens):
            yield expand_contiguous(np.asarray(chunk, np.int32), bos_id=bos_id)
