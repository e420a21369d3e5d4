"""Document layout: token ids of documents in, fixed-length example arrays out.

The one home of how a document becomes model input, for pretraining and fine-tuning alike.
Pure functions of token ids and a few sizes (no tokenizer, no I/O), so a streaming pipeline,
an in-memory builder and a fine-tuning reader all call the same code. Two layouts:

- ``"blocks"`` (the seed checkpoint's): a document is split into sentences
  (``split_sentences``), the sentences' tokens are grouped greedily into blocks of at most
  ``block_size - 1`` tokens (``group_blocks``; a sentence longer than that is cut into pieces),
  and ``seq_len // block_size`` blocks make an example (``blocks_example``): each block starts
  with ``</s>`` (the first with ``<s>``), is padded with ``<pad>`` to ``block_size`` inside the
  sequence (attention mask 0 there), and has global attention on its start. Blocks an example
  does not fill are all padding. ``document_blocks_examples`` cuts one document into examples.
- ``"contiguous"``: documents, each followed by ``</s>``, are joined into one stream and cut
  into examples of ``<s>`` + ``seq_len - 1`` tokens (``contiguous_examples``): no padding, no
  global attention.

Every example is a dict of ``input_ids``, ``attention_mask``, ``global_attention_mask``: int32
arrays of shape (seq_len,).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

LAYOUTS = ("blocks", "contiguous")
MODEL_KEYS = ("input_ids", "attention_mask", "global_attention_mask")

Example = dict[str, np.ndarray]

# A sentence ends after . ! or ? (and closing quotes/brackets) before whitespace; a blank line
# also ends one. The whitespace stays at the start of the next sentence, so the pieces
# tokenize as the running text does.
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])(?=\s)|(?<=[.!?][\"')\]])(?=\s)|(?=\n[ \t]*\n)")


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


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (a regex splitter: good for prose, approximate for abbreviations).

    Whitespace between sentences starts the next one, so the sentences joined give back the
    text (less trailing whitespace).
    """
    sentences: list[str] = []
    pending = ""
    for piece in _SENTENCE_SPLIT_RE.split(text):
        if piece.strip():
            sentences.append(pending + piece)
            pending = ""
        else:
            pending += piece
    return sentences


def group_blocks(sentences: Iterable[Sequence[int]], content: int) -> list[list[int]]:
    """Greedy grouping of sentences (token id lists) into blocks of at most ``content`` tokens.

    A sentence goes into the current block if it fits, else it starts a new one; a sentence
    longer than ``content`` is cut into ``content``-token pieces first. Order is kept.
    """
    blocks: list[list[int]] = []
    current: list[int] = []
    for sentence in sentences:
        for start in range(0, len(sentence), content):
            piece = sentence[start : start + content]
            if current and len(current) + len(piece) > content:
                blocks.append(current)
                current = []
            current.extend(piece)
    if current:
        blocks.append(current)
    return blocks


def blocks_example(
    blocks: Sequence[Sequence[int]], *, seq_len: int, block_size: int, bos_id: int, eos_id: int, pad_id: int
) -> Example:
    """One example from at most ``seq_len // block_size`` blocks of at most ``block_size - 1`` tokens."""
    input_ids = np.full((seq_len,), pad_id, np.int32)
    attention_mask = np.zeros((seq_len,), np.int32)
    global_mask = np.zeros((seq_len,), np.int32)
    for j, block in enumerate(blocks):
        start = j * block_size
        n = 1 + len(block)
        input_ids[start] = bos_id if j == 0 else eos_id
        input_ids[start + 1 : start + n] = block
        attention_mask[start : start + n] = 1
        global_mask[start] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "global_attention_mask": global_mask}


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
    """The ``"blocks"`` examples of one document, given its sentences as token id lists.

    A long document makes several examples; an example (in practice the last) with fewer than
    ``min_blocks`` blocks is dropped.
    """
    blocks = group_blocks(sentences, block_size - 1)
    n_blocks = seq_len // block_size
    chunks = (blocks[i : i + n_blocks] for i in range(0, len(blocks), n_blocks))
    return [
        blocks_example(chunk, seq_len=seq_len, block_size=block_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
        for chunk in chunks
        if len(chunk) >= min_blocks
    ]


def contiguous_examples(
    documents: Iterable[Sequence[int]], *, seq_len: int, bos_id: int, eos_id: int
) -> Iterator[tuple[int, Example]]:
    """``(document index, example)`` of the ``"contiguous"`` layout over a stream of documents.

    Each document's tokens are followed by ``</s>``; the stream is cut into ``<s>`` +
    ``seq_len - 1`` tokens. The index is that of the document holding the example's first
    token. Tokens left at the end (fewer than one example) are dropped.
    """
    span = seq_len - 1
    stream: list[int] = []
    stream_docs: list[int] = []
    for doc_index, tokens in enumerate(documents):
        stream.extend(tokens)
        stream.append(eos_id)
        stream_docs.extend([doc_index] * (len(tokens) + 1))
        n_full = len(stream) // span
        for i in range(n_full):
            input_ids = np.asarray([bos_id, *stream[i * span : (i + 1) * span]], np.int32)
            yield stream_docs[i * span], {
                "input_ids": input_ids,
                "attention_mask": np.ones((seq_len,), np.int32),
                "global_attention_mask": np.zeros((seq_len,), np.int32),
            }
        del stream[: n_full * span], stream_docs[: n_full * span]
