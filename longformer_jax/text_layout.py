"""Text to model inputs, as a model was fine-tuned: the layouts that need no Flax (the serving loader uses them).

The sentence-block layout of the seed checkpoint (``group_blocks``, ``expand_blocks``, ``blocks_example``;
``train.layout`` builds its examples with them) and :class:`TextLayout`, which lays out the texts of
``ExportedModel.predict`` exactly as ``train.finetune`` laid out its records (the ``"finetuning"`` settings an
export carries in its manifest):

- document / sequence classification, ``"blocks"``: a string's sentences (``longformer_jax.sentences``) grouped
  greedily into blocks of ``block_size - 1`` tokens (a list of strings: each item in blocks of its own), the
  first ``seq_len // block_size`` blocks kept, each block starting with ``</s>`` (the first ``<s>``), padded
  inside the sequence, global attention on the block starts;
- document / sequence classification, ``"contiguous"``: ``<s>`` + the first ``seq_len - 2`` tokens + ``</s>``,
  global attention on ``<s>``;
- sequential sentence classification: a list of sentences, one block each (cut to ``block_size - 1`` tokens),
  in windows of ``seq_len // block_size`` blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from longformer_jax.sentences import split_sentences

TEXT_TASKS = ("sequence-classification", "document-classification", "sequential-sentence-classification")
Example = dict[str, np.ndarray]


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


def expand_blocks(
    lengths: np.ndarray, tokens: np.ndarray, *, seq_len: int, block_size: int, bos_id: int, eos_id: int, pad_id: int
) -> Example:
    """A ``"blocks"`` example from its block lengths (n,) and content tokens (sum of lengths,)."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.arange(len(lengths)) * block_size
    # Position of each content token: its block's start + 1 + its offset inside the block.
    offsets = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.repeat(starts, lengths) + 1 + offsets
    input_ids = np.full((seq_len,), pad_id, np.int32)
    attention_mask = np.zeros((seq_len,), np.int32)
    global_mask = np.zeros((seq_len,), np.int32)
    input_ids[starts] = eos_id
    input_ids[starts[:1]] = bos_id
    input_ids[positions] = tokens
    attention_mask[starts] = 1
    attention_mask[positions] = 1
    global_mask[starts] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "global_attention_mask": global_mask}


def blocks_example(
    blocks: Sequence[Sequence[int]], *, seq_len: int, block_size: int, bos_id: int, eos_id: int, pad_id: int
) -> Example:
    """One example from at most ``seq_len // block_size`` blocks of at most ``block_size - 1`` tokens."""
    lengths = np.asarray([len(b) for b in blocks], np.int64)
    tokens = np.asarray([t for b in blocks for t in b], np.int32)
    return expand_blocks(
        lengths, tokens, seq_len=seq_len, block_size=block_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id
    )


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """How ``predict`` lays out texts (see the module docstring): the fine-tuning run's settings."""

    task: str
    kind: str
    seq_len: int
    block_size: int
    bos: int
    eos: int
    pad: int
    multi_label: bool = False

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], largest: int) -> TextLayout:
        """The layout of an export: its ``"finetuning"`` settings, else (an HF classifier) the contiguous layout
        at the largest bucket. ``seq_len`` is at most ``largest``."""
        s = manifest.get("finetuning") or {}
        task = s.get("task") or {"sequence-classification": "document-classification"}.get(manifest["task"])
        if task not in ("document-classification", "sequential-sentence-classification"):
            raise ValueError(f"predict(texts) takes classification models; this export's task is {task!r}.")
        kind = s.get("layout") or ("blocks" if manifest["task"] in TEXT_TASKS[1:] else "contiguous")
        block = int(s.get("block_size") or manifest.get("sentence_block_size") or 128)
        seq_len = min(int(s.get("seq_len") or largest), largest)
        if kind == "blocks":
            seq_len -= seq_len % block
        ids = manifest["special_tokens"]
        return cls(task, kind, seq_len, block, ids["bos"], ids["eos"], ids["pad"], bool(s.get("multi_label")))

    @property
    def num_blocks(self) -> int:
        return self.seq_len // self.block_size

    def _document(self, tokens: list[int], blocks: list[list[int]]) -> Example:
        if self.kind == "blocks":
            return blocks_example(
                blocks[: self.num_blocks],
                seq_len=self.seq_len,
                block_size=self.block_size,
                bos_id=self.bos,
                eos_id=self.eos,
                pad_id=self.pad,
            )
        ids = [self.bos, *tokens[: self.seq_len - 2], self.eos]
        n = len(ids)
        gm = np.zeros((self.seq_len,), np.int32)
        gm[0] = 1
        return {
            "input_ids": np.asarray(ids + [self.pad] * (self.seq_len - n), np.int32),
            "attention_mask": np.asarray([1] * n + [0] * (self.seq_len - n), np.int32),
            "global_attention_mask": gm,
        }

    def _encode(self, tokenizer: Any, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []

    def encode(self, tokenizer: Any, texts: Sequence[Any]) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
        """(arrays (N, seq_len), per row (text index, its first sentence)) of ``texts`` (a ``tokenizers``
        tokenizer)."""
        rows: list[Example] = []
        owners: list[tuple[int, int]] = []
        content = self.block_size - 1
        for t, text in enumerate(texts):
            if self.task == "sequential-sentence-classification":
                if isinstance(text, str):
                    raise ValueError("sequential sentence classification takes a list of sentences per text.")
                blocks = [b[:content] for b in self._encode(tokenizer, list(text))]
                for a in range(0, max(len(blocks), 1), self.num_blocks):
                    rows.append(self._document([], blocks[a : a + self.num_blocks]))
                    owners.append((t, a))
                continue
            if isinstance(text, str):
                pieces = self._encode(tokenizer, split_sentences(text))
                blocks = group_blocks(pieces, content)
            else:
                blocks = [b for item in self._encode(tokenizer, list(text)) for b in group_blocks([item], content)]
            rows.append(self._document([i for b in blocks for i in b], blocks))
            owners.append((t, 0))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, owners


def _scores(logits_K: np.ndarray, names: Sequence[str], multi_label: bool) -> tuple[Any, dict[str, float]]:
    """(label, every label's probability) of one unit; multi-label: (labels over 0.5, every sigmoid)."""
    logits_K = np.asarray(logits_K, np.float64)
    if multi_label:
        p = 1.0 / (1.0 + np.exp(-logits_K))
        return [n for n, v in zip(names, p) if v > 0.5], {n: float(v) for n, v in zip(names, p)}
    e = np.exp(logits_K - logits_K.max())
    p = e / e.sum()
    return names[int(np.argmax(logits_K))], {n: float(v) for n, v in zip(names, p)}


def label_predictions(
    layout: TextLayout, logits: np.ndarray, owners: list[tuple[int, int]], texts: Sequence[Any], names: Sequence[str]
) -> list[dict[str, Any]]:
    """``{"label", "scores"}`` per text (sequential sentences: a list of labels and of score dicts)."""
    if layout.task != "sequential-sentence-classification":
        out = [_scores(row, names, layout.multi_label) for row in logits]
        return [{"label": label, "scores": scores} for label, scores in out]
    per: list[list[Any]] = [[None] * len(text) for text in texts]
    for row, (t, a) in zip(logits, owners):
        for k in range(min(layout.num_blocks, len(texts[t]) - a)):
            per[t][a + k] = _scores(row[k], names, layout.multi_label)
    return [{"label": [u[0] for u in units], "scores": [u[1] for u in units]} for units in per]
