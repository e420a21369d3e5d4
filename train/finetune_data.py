"""Fine-tuning data: task records in, laid-out examples and targets out.

The one home of how the records of a fine-tuning task become model inputs (``python -m train.finetune``).

**Records.** ``read_records(spec, split)`` reads ``.jsonl`` / ``.json`` (a list of objects), ``.csv``
(cells holding JSON lists or objects are decoded), ``.parquet``, a task folder (``DIR/train.jsonl``,
``DIR/validation.jsonl``, ``DIR/test.jsonl`` and ``DIR/labels.txt``, as ``python -m train.demo_tasks``
writes them) or ``hf:NAME[:CONFIG[:SPLIT]]`` (``datasets``; integer class labels become their names).
Field names are ``Fields`` (the program's ``--*-field`` flags); what each task reads:

- ``document-classification``: ``text`` (a string, or a list of paragraphs / sentences) and ``label``
  (``labels``, a list, with multi-label); optional ``pair`` field (e.g. a document-NLI hypothesis),
  laid out in the last block;
- ``sequential-sentence-classification``: ``text`` a list of blocks (sentences, paragraphs) and
  ``labels`` one per block (with multi-label: a list of labels per block);
- ``multiple-choice``: ``text`` (the context), ``choices`` (a list, the same length in every record),
  ``label`` (the index of the answer), optional ``question``;
- ``question-answering``: ``question``, ``context`` (or ``text``) and ``answers`` (SQuAD's
  ``{"text": [...], "answer_start": [...]}``, or ``answer`` + ``answer_start``);
- ``token-classification``: ``text`` (a list of words, or a string split on whitespace) and ``labels``
  (one per word).

Every record may have an ``id`` (else ``<split>-<n>``). Bad input is a ``DataError`` (a ``ValueError``)
naming the record, the field and the fix.

**Layout.** The document layout is ``train.layout``'s (the pretraining layout, one implementation):
``"blocks"`` (text split into sentences, grouped greedily into blocks of ``block_size - 1`` tokens,
each block starting with ``</s>`` (the first with ``<s>``), padded inside the sequence, global
attention on every block start) or ``"contiguous"`` (``<s> A </s></s> B </s>``, HF's pair format, no
inner padding). A list ``text`` puts each item in blocks of its own (paragraphs as blocks). Per task:

- document classification: the first blocks that fit (the pair, if any, in the last block);
- sequential sentence classification: one block per item, in windows of ``seq_len // block_size``
  blocks (a long document makes several examples, every block is predicted once);
- multiple choice: per choice, the context blocks (those around the first ``<mask>`` token when the
  context holds one, else the first), the question block, the choice block: (choices, seq_len) rows;
  global attention on the question and the choice (``transformers``' rule); ``"blocks"``: also on every
  block start, ``<s>`` included (the pretraining layout, which ``transformers`` cannot infer, so the mask is
  always given), ``"contiguous"``: not on ``<s>`` (``transformers``' rule); with ``choice_scoring="masked-lm"``
  one row per record instead: the context around its ``<mask>`` (then the question, global), where the
  masked-LM head scores each choice's tokens (``masked_positions``, ``choice_ids``, ``choice_mask``);
- question answering: the question in the first block (global attention on it, as ``transformers``),
  the context in windows of the remaining blocks overlapping by one block; a window without the
  answer points at ``<s>`` (HF's rule); the best span over all windows is the prediction;
- token classification: words grouped into blocks, in windows; the first sub-token of a word
  carries its label.

**Truncation** is counted, never silent: ``TaskEncoder.report`` holds how many records lost tokens
(and how many), and how many were split into windows; the program prints it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from longformer_jax.losses import IGNORE_INDEX
from train.corpus import parse_hf_spec
from train.layout import LAYOUTS, blocks_example, group_blocks, sentence_ids
from train.sentences import split_sentences

TASK_NAMES = (
    "document-classification",
    "sequential-sentence-classification",
    "multiple-choice",
    "question-answering",
    "token-classification",
)
LABELLED_TASKS = ("document-classification", "sequential-sentence-classification", "token-classification")
SPLITS = ("train", "validation", "test")
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
LABELS_FILE = "labels.txt"
TARGET_KEYS = ("labels", "start_positions", "end_positions")


# How a multiple-choice model scores its choices: "cls", transformers' head (each choice laid out beside the
# context, <s> pooled, one logit); "masked-lm", the masked-LM head at the context's <mask> (one row per record,
# a choice's score the mean log-probability of its tokens there: cloze-style tasks).
CHOICE_SCORINGS = ("cls", "masked-lm")


class DataError(ValueError):
    """A record, field or file of fine-tuning data that cannot be used; the message names the fix."""


# ----------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class Fields:
    """The names of the record fields each task reads (see the module docstring)."""

    id: str = "id"
    text: str = "text"
    label: str = "label"
    labels: str = "labels"
    choices: str = "choices"
    question: str = "question"
    context: str = "context"
    answers: str = "answers"
    pair: str | None = None


@dataclasses.dataclass
class Records:
    """The rows of one split, where they came from, and class names found in the source (``datasets``)."""

    rows: list[dict[str, Any]]
    source: str
    class_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def where(self, i: int) -> str:
        return f"{self.source} record {i + 1}"


def task_folder_files(path: str | Path) -> dict[str, Path | None]:
    """``train``, ``validation``, ``test`` and ``labels`` files of a task folder (None where absent)."""
    path = Path(path)
    out: dict[str, Path | None] = {}
    for split in SPLITS:
        out[split] = next((path / f"{split}{s}" for s in RECORD_SUFFIXES if (path / f"{split}{s}").is_file()), None)
    out["labels"] = path / LABELS_FILE if (path / LABELS_FILE).is_file() else None
    return out


def _decode_cells(row: dict[str, Any]) -> dict[str, Any]:
    """CSV cells that hold a JSON list or object, decoded."""
    out = {}
    for k, v in row.items():
        if isinstance(v, str) and v[:1] in ("[", "{"):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def _read_file(path: Path) -> list[dict[str, Any]]:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return [_decode_cells(r) for r in csv.DictReader(f)]
    text = path.read_text(encoding="utf-8")
    if name.endswith(".json") and text.lstrip()[:1] == "[":
        rows = json.loads(text)
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON object ({e}); expected one per line") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad + 1} is a {type(rows[bad]).__name__}, not a JSON object")
    return rows


def _class_names(feature: Any) -> list[str] | None:
    names = getattr(feature, "names", None)
    if names is None:
        names = getattr(getattr(feature, "feature", None), "names", None)
    return list(names) if names is not None else None


def _read_hf(spec: str, split: str) -> Records:
    name, config, spec_split = parse_hf_spec(spec)
    if len(spec[3:].split(":")) < 3:
        spec_split = split
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"reading {spec!r} needs the `datasets` package: pip install 'longformer-jax[data]'") from e
    try:
        ds = datasets.load_dataset(name, config, split=spec_split)
    except Exception as e:  # noqa: BLE001 - network, unknown dataset or split: one actionable line
        raise DataError(f"cannot load {spec!r} (split {spec_split!r}): {type(e).__name__}: {e}") from None
    class_names = {col: n for col, f in ds.features.items() if (n := _class_names(f)) is not None}
    rows = []
    for r in ds:
        r = dict(r)
        for col, names in class_names.items():
            v = r.get(col)
            r[col] = [names[i] for i in v] if isinstance(v, list) else (names[v] if isinstance(v, int) else v)
        rows.append(r)
    return Records(rows, f"{spec} ({spec_split})", class_names)


def read_records(spec: str | Path, split: str = "train") -> Records:
    """The records of ``spec`` (a file, a task folder's ``split`` file, or ``hf:NAME[:CONFIG[:SPLIT]]``)."""
    spec = str(spec)
    if spec.startswith("hf:"):
        return _read_hf(spec, split)
    path = Path(spec).expanduser()
    if path.is_dir():
        file = task_folder_files(path)[split]
        if file is None:
            raise DataError(f"task folder {path} has no {split} file ({', '.join(split + s for s in RECORD_SUFFIXES)})")
        path = file
    if not path.is_file():
        raise DataError(
            f"{spec} does not exist; give a {'/'.join(RECORD_SUFFIXES)} file, a task folder "
            "(DIR/train.jsonl ...) or hf:NAME[:CONFIG[:SPLIT]]"
        )
    if not path.name.endswith(RECORD_SUFFIXES):
        raise DataError(f"{path} is not a {'/'.join(RECORD_SUFFIXES)} file")
    rows = _read_file(path)
    if not rows:
        raise DataError(f"{path} holds no records")
    return Records(rows, str(path))


# ----------------------------------------------------------------------------------------------
# Labels


def label_name(value: Any) -> str:
    """A label value of a record as its name (labels are compared as strings)."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """The label names of a task, in the order of the model's outputs (``id2label``)."""

    names: tuple[str, ...]
    source: str = "the training data"

    def __post_init__(self):
        dup = [n for n, c in Counter(self.names).items() if c > 1]
        if dup:
            raise DataError(f"{self.source}: label(s) {dup} appear more than once")
        if len(self.names) < 1:
            raise DataError(f"{self.source}: no labels")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, value: Any, where: str) -> int:
        name = label_name(value)
        try:
            return self.names.index(name)
        except ValueError:
            shown = ", ".join(self.names[:20]) + (" ..." if len(self.names) > 20 else "")
            raise DataError(
                f"{where}: label {name!r} is not one of the {len(self.names)} labels of {self.source} "
                f"({shown}); fix the record or give every label in --labels FILE"
            ) from None

    @classmethod
    def from_file(cls, path: str | Path) -> LabelSet:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"--labels {p}: no such file; give a text file with one label per line")
        return cls(tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()), str(p))

    @classmethod
    def from_values(cls, values: Sequence[Any], source: str = "the training data") -> LabelSet:
        """The distinct values, sorted (numbers numerically)."""
        distinct = set(values)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct)
        key = (lambda v: (v, "")) if numeric else (lambda v: (0, label_name(v)))
        return cls(tuple(label_name(v) for v in sorted(distinct, key=key)), source)


# ----------------------------------------------------------------------------------------------
# Layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """How blocks of token ids become one example: ``train.layout``'s layouts with fine-tuning's parts.

    An example is a list of *parts* (e.g. question, context), each a list of blocks (token id lists of
    at most ``block_size - 1`` ids). ``"blocks"``: the blocks of all parts one after the other, as
    ``train.layout.blocks_example`` lays them out; ``"contiguous"``: ``<s> part </s></s> part </s>``.
    """

    kind: str
    seq_len: int
    block_size: int
    bos: int
    eos: int
    pad: int

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise DataError(f"layout={self.kind!r}; expected one of {LAYOUTS}")
        if self.kind == "blocks" and self.seq_len % self.block_size:
            raise DataError(f"seq_len={self.seq_len} is not a multiple of block_size={self.block_size}")

    @property
    def content(self) -> int:
        return self.block_size - 1

    @property
    def num_blocks(self) -> int:
        return self.seq_len // self.block_size

    def group(self, units: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """``train.layout.group_blocks``: units (sentences) packed greedily into blocks, long ones cut."""
        return group_blocks(units, self.content)

    def fits(self, parts: Sequence[Sequence[Sequence[int]]]) -> bool:
        if self.kind == "blocks":
            return sum(len(p) for p in parts) <= self.num_blocks
        return sum(len(b) for p in parts for b in p) + 2 * len(parts) <= self.seq_len

    def example(
        self, parts: Sequence[Sequence[Sequence[int]]], global_parts: Sequence[int] = (), bos_global: bool = True
    ) -> tuple[dict[str, np.ndarray], list[list[int]]]:
        """The arrays of one example and, per part and block, the position of the block's first token
        (the content follows it contiguously). Global attention: the block starts (``"blocks"``) or
        ``<s>`` when ``bos_global`` (``"contiguous"``), plus every token of ``global_parts``."""
        offsets: list[list[int]] = []
        if self.kind == "blocks":
            flat = [b for p in parts for b in p]
            ex = blocks_example(
                flat,
                seq_len=self.seq_len,
                block_size=self.block_size,
                bos_id=self.bos,
                eos_id=self.eos,
                pad_id=self.pad,
            )
            j = 0
            for p in parts:
                offsets.append([(j + k) * self.block_size + 1 for k in range(len(p))])
                j += len(p)
        else:
            ids = [self.bos]
            for i, p in enumerate(parts):
                if i:
                    ids += [self.eos, self.eos]
                offsets.append([])
                for b in p:
                    offsets[-1].append(len(ids))
                    ids += list(b)
            ids.append(self.eos)
            n = len(ids)
            ex = {
                "input_ids": np.asarray(ids + [self.pad] * (self.seq_len - n), np.int32),
                "attention_mask": np.asarray([1] * n + [0] * (self.seq_len - n), np.int32),
                "global_attention_mask": np.zeros((self.seq_len,), np.int32),
            }
            ex["global_attention_mask"][0] = int(bos_global)
        for i in global_parts:
            for start, b in zip(offsets[i], parts[i]):
                ex["global_attention_mask"][start : start + len(b)] = 1
        return ex, offsets

    def prefix(self, blocks: list[list[int]], others: Sequence[Sequence[Sequence[int]]], first: bool = True):
        """The longest run of ``blocks`` that fits beside the parts ``others`` (``first``: placed before
        them), from the start; ``"contiguous"`` fills the rest with the start of the next block."""

        def fits(k):
            part = [blocks[:k]]
            return self.fits(part + list(others) if first else list(others) + part)

        k = min(len(blocks), self.num_blocks if self.kind == "blocks" else len(blocks))
        while k > 0 and not fits(k):
            k -= 1
        kept = [list(b) for b in blocks[:k]]
        if self.kind == "contiguous" and k < len(blocks):
            used = sum(len(b) for p in others for b in p) + sum(len(b) for b in kept) + 2 * (len(others) + 1)
            if self.seq_len - used > 0:
                kept.append(list(blocks[k][: self.seq_len - used]))
        return kept

    def around(self, blocks: list[list[int]], center: int, others: Sequence[Sequence[Sequence[int]]]):
        """The run of whole ``blocks`` around block ``center`` that fits before ``others`` (growing on
        both sides in turn)."""
        a, b = center, center + 1
        grown = True
        while grown:
            grown = False
            for a2, b2 in ((a, b + 1), (a - 1, b)):
                if a2 >= 0 and b2 <= len(blocks) and self.fits([blocks[a2:b2], *others]):
                    a, b, grown = a2, b2, True
        return [list(x) for x in blocks[a:b]] if self.fits([blocks[a:b], *others]) else []

    def windows(
        self, n: int, others: Sequence[Sequence[Sequence[int]]], blocks: Sequence[Sequence[int]], overlap: int = 0
    ) -> list[tuple[int, int]]:
        """[a, b) ranges of ``blocks`` (n of them) that each fit after ``others``, covering all,
        consecutive ranges sharing ``overlap`` blocks."""
        out, a = [], 0
        while True:
            b = a
            while b < n and self.fits([*others, blocks[a : b + 1]]):
                b += 1
            if b == a:  # a single block does not fit beside the others: take it cut (cannot happen in "blocks")
                b = a + 1
            out.append((a, b))
            if b >= n:
                return out
            a = b - overlap if b - overlap > a else b


# ----------------------------------------------------------------------------------------------
# Truncation report


@dataclasses.dataclass
class Truncation:
    """What laying the records out cut or split: ``counts[what]`` records, ``tokens[what]`` tokens dropped."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    tokens: Counter = dataclasses.field(default_factory=Counter)

    def add(self, what: str, dropped_tokens: int = 0) -> None:
        self.counts[what] += 1
        self.tokens[what] += dropped_tokens

    def lines(self, n_records: int, split: str) -> list[str]:
        """One line per kind, e.g. ``"train: 12 of 134 records: document longer than the input
        (4,321 tokens dropped)"``."""
        out = []
        for what, n in sorted(self.counts.items()):
            dropped = f" ({self.tokens[what]:,} tokens dropped)" if self.tokens[what] else ""
            out.append(f"{split}: {n:,} of {n_records:,} records: {what}{dropped}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {what: {"records": n, "tokens_dropped": self.tokens[what]} for what, n in sorted(self.counts.items())}


# ----------------------------------------------------------------------------------------------
# Encoding


@dataclasses.dataclass
class Encoded:
    """The examples of one split and what is needed to turn their outputs back into per-record predictions.

    ``arrays``: model inputs and targets with a leading example axis; ``record`` (N,): the record of each
    example; ``positions``: per example, where the predicted units are (sequential sentence
    classification (N, blocks): the block's item index or -1; token classification (N, L): the word
    index or -1; question answering (N, L, 2): the token's character span in the context or -1);
    ``ids``, ``gold`` (None per record without targets) and ``contexts`` (question answering) per record.
    """

    task: str
    arrays: dict[str, np.ndarray]
    record: np.ndarray
    positions: np.ndarray | None
    ids: list[str]
    gold: list[Any]
    contexts: list[str] | None = None
    units: list[int] | None = None  # per record: blocks (sequential sentences) or words (tokens)

    def __len__(self) -> int:
        return len(self.record)

    @property
    def has_gold(self) -> bool:
        return all(g is not None for g in self.gold)


class TaskEncoder:
    """Lays out the records of a task (see the module docstring); ``report`` counts what was cut.

    Args:
      task: one of ``TASK_NAMES``.
      tokenizer: a ``transformers`` fast tokenizer (offsets are needed for question answering and
        token classification).
      layout: the ``Layout``.
      fields: the record fields.
      labels: the label set (labelled tasks).
      multi_label: labels are sets (document and sequential sentence classification).
      choice_scoring: multiple choice: ``"cls"`` (a row per choice) or ``"masked-lm"`` (one row, the choices
        scored at the context's ``<mask>``).
    """

    def __init__(
        self,
        task: str,
        tokenizer: Any,
        layout: Layout,
        fields: Fields = Fields(),
        labels: LabelSet | None = None,
        multi_label: bool = False,
        choice_scoring: str = "cls",
    ):
        if task not in TASK_NAMES:
            raise DataError(f"task={task!r}; expected one of {TASK_NAMES}")
        if task in LABELLED_TASKS and labels is None:
            raise DataError(f"{task} needs a label set")
        if multi_label and task not in ("document-classification", "sequential-sentence-classification"):
            raise DataError(f"--multi-label applies to document and sequential sentence classification, not {task}")
        if choice_scoring not in CHOICE_SCORINGS or (choice_scoring != "cls" and task != "multiple-choice"):
            raise DataError(
                f"choice_scoring={choice_scoring!r}: {CHOICE_SCORINGS} for multiple choice, 'cls' otherwise"
            )
        if task == "sequential-sentence-classification" and layout.kind != "blocks":
            raise DataError("sequential sentence classification predicts one label per block: it needs --layout blocks")
        self.task, self.tok, self.layout, self.fields = task, tokenizer, layout, fields
        self.labels, self.multi_label, self.choice_scoring = labels, multi_label, choice_scoring
        self.mask_id = getattr(tokenizer, "mask_token_id", None)
        self.report = Truncation()
        self._contexts: dict[str, tuple] = {}  # the last context's tokens (question answering)

    # --- helpers ---
    def _tokens(self, texts: list[str], offsets: bool = False):
        if not texts:
            return ([], []) if offsets else []
        enc = self.tok(
            texts, add_special_tokens=False, return_offsets_mapping=offsets, return_attention_mask=False, verbose=False
        )
        return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]

    def _field(self, row: dict, name: str | None, where: str, required: bool = True) -> Any:
        if name is not None and name in row and row[name] is not None:
            return row[name]
        if required:
            flag = next((f.name for f in dataclasses.fields(self.fields) if getattr(self.fields, f.name) == name), "")
            raise DataError(
                f"{where}: no field {name!r} (fields: {sorted(row)}); add it, or name the field that "
                f"holds it with --{flag.replace('_', '-')}-field"
            )
        return None

    def _text(self, row: dict, where: str, name: str | None = None) -> str | list[str]:
        name = name or self.fields.text
        text = self._field(row, name, where)
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            if not any(t.strip() for t in text):
                raise DataError(f"{where}: field {name!r} is empty; fill it or drop the record")
            return text
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field {name!r} is a {type(text).__name__}; expected a string or a list of strings"
            )
        if not text.strip():
            raise DataError(f"{where}: field {name!r} is empty; fill it or drop the record")
        return text

    def _blocks(self, text: str | list[str]) -> list[list[int]]:
        """A string: its sentences grouped into blocks (the pretraining layout); a list: each item in blocks
        of its own."""
        if isinstance(text, str):
            return self.layout.group(sentence_ids(text, self._tokens))
        return [b for item in self._tokens(list(text)) for b in self.layout.group([item])]

    def _one_block(self, tokens: list[int], what: str) -> list[int]:
        if len(tokens) > self.layout.content:
            self.report.add(
                f"{what} longer than a block of {self.layout.content} tokens: cut", len(tokens) - self.layout.content
            )
        return list(tokens[: self.layout.content])

    def _target(self, value: Any, where: str) -> Any:
        """A label (an index) or, multi-label, a label set (a 0/1 vector)."""
        if not self.multi_label:
            return self.labels.index(value, where)
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: with --multi-label a label set (a list) is expected, got {value!r}")
        hot = np.zeros((len(self.labels),), np.float32)
        for v in value:
            hot[self.labels.index(v, where)] = 1.0
        return hot

    def _empty_target(self, shape: tuple[int, ...] = ()) -> np.ndarray:
        if self.multi_label:
            return np.full((*shape, len(self.labels)), IGNORE_INDEX, np.float32)
        return np.full(shape, IGNORE_INDEX, np.int32)

    # --- the tasks ---
    def _document(self, row: dict, where: str, targets: bool):
        blocks = self._blocks(self._text(row, where))
        others = []
        if self.fields.pair is not None:
            pair = self._field(row, self.fields.pair, where)
            others = [[self._one_block(self._tokens([str(pair)])[0], f"field {self.fields.pair!r}")]]
        kept = self.layout.prefix(blocks, others)
        dropped = sum(len(b) for b in blocks) - sum(len(b) for b in kept)
        if dropped:
            self.report.add(f"document longer than {self.layout.seq_len} tokens: cut", dropped)
        ex, _ = self.layout.example([kept, *others])
        value = self._field(row, self.fields.labels if self.multi_label else self.fields.label, where, targets)
        gold = None if value is None else self._target(value, where)
        ex["labels"] = np.asarray(gold) if gold is not None else self._empty_target()
        return [ex], None, gold, None

    def _sequence(self, row: dict, where: str, targets: bool):
        text = self._text(row, where)
        if isinstance(text, str):
            raise DataError(
                f"{where}: field {self.fields.text!r} must be a list of blocks (one label each) for "
                "sequential sentence classification"
            )
        values = self._field(row, self.fields.labels, where, targets)
        if values is not None and (not isinstance(values, list) or len(values) != len(text)):
            raise DataError(
                f"{where}: field {self.fields.labels!r} must be a list with one label per block "
                f"({len(text)} blocks, got {len(values) if isinstance(values, list) else values!r})"
            )
        blocks = [self._one_block(t, "block") for t in self._tokens(list(text))]
        gold = None if values is None else [self._target(v, where) for v in values]
        n = self.layout.num_blocks
        examples, positions = [], []
        for a in range(0, len(blocks), n):
            ex, _ = self.layout.example([blocks[a : a + n]])
            ex["labels"] = self._empty_target((n,))
            pos = np.full((n,), -1, np.int32)
            pos[: len(blocks[a : a + n])] = np.arange(a, min(a + n, len(blocks)))
            if gold is not None:
                ex["labels"][: len(gold[a : a + n])] = np.asarray(gold[a : a + n])
            examples.append(ex)
            positions.append(pos)
        if len(examples) > 1:
            self.report.add(f"more than {n} blocks: split into windows of {n} blocks")
        return examples, positions, gold, len(blocks)

    def _choice(self, row: dict, where: str, targets: bool):
        context = self._text(row, where)
        choices = self._field(row, self.fields.choices, where)
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{where}: field {self.fields.choices!r} must be a list of 2 or more choices")
        question = self._field(row, self.fields.question, where, required=False)
        blocks = self._blocks(context)
        q = [[self._one_block(self._tokens([str(question)])[0], "question")]] if question else []
        center = next((i for i, b in enumerate(blocks) if self.mask_id in b), None)
        if self.choice_scoring == "masked-lm":
            ex = self._cloze_row(blocks, center, q, [str(c) for c in choices], where)
        else:
            ex = self._choice_rows(blocks, center, q, [str(c) for c in choices])
        value = self._field(row, self.fields.label, where, targets)
        gold = None
        if value is not None:
            try:
                gold = int(value)
            except (TypeError, ValueError):
                gold = -1
            if not 0 <= gold < len(choices):
                raise DataError(
                    f"{where}: label {value!r} is not the index of one of its {len(choices)} choices "
                    f"(0 to {len(choices) - 1})"
                )
        ex["labels"] = np.asarray(IGNORE_INDEX if gold is None else gold, np.int32)
        return [ex], None, gold, None

    def _context_around(self, blocks: list[list[int]], center: int | None, others) -> list[list[int]]:
        """The context blocks that fit beside ``others``: around the first ``<mask>`` block, else the first."""
        kept = self.layout.prefix(blocks, others) if center is None else self.layout.around(blocks, center, others)
        dropped = sum(len(b) for b in blocks) - sum(len(b) for b in kept)
        if dropped:
            self.report.add(f"context longer than the input: cut{'' if center is None else ' around <mask>'}", dropped)
        return kept

    def _choice_rows(self, blocks, center, q, choices: list[str]) -> dict[str, np.ndarray]:
        """``choice_scoring="cls"``: per choice, a row of the context, the question and the choice."""
        choice_blocks = [self._one_block(t, "choice") for t in self._tokens(choices)]
        kept = self._context_around(blocks, center, [*q, [max(choice_blocks, key=len)]])
        # transformers' rule: the question and the choice are global, <s> is not ("contiguous"); the blocks
        # layout keeps every block start global, <s> included, as the model was pretrained (with <s> local a
        # 2-layer model sees the context only through the other block starts, and learns far more slowly).
        global_parts = list(range(1, len(q) + 2))
        rows = [self.layout.example([kept, *q, [c]], global_parts, bos_global=False)[0] for c in choice_blocks]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _cloze_row(self, blocks, center, q, choices: list[str], where: str) -> dict[str, np.ndarray]:
        """``choice_scoring="masked-lm"``: one row, the context around its ``<mask>`` (then the question, global),
        ``masked_positions`` (1,) where the ``<mask>`` is, and each choice's tokens as they would follow a space
        (``choice_ids`` / ``choice_mask`` (choices, block_size - 1))."""
        if center is None:
            raise DataError(
                f"{where}: --choice-scoring masked-lm scores the choices at the context's mask token "
                f"({getattr(self.tok, 'mask_token', None)!r}) and this context has none: put it where the answer "
                "goes, or use --choice-scoring cls"
            )
        kept = self._context_around(blocks, center, q)
        at = next((i for i, b in enumerate(kept) if self.mask_id in b), None)
        if at is None:
            raise DataError(f"{where}: the question leaves no room for the context's mask token; shorten the question")
        ex, offsets = self.layout.example([kept, *q], list(range(1, len(q) + 1)))
        ex["masked_positions"] = np.asarray([offsets[0][at] + kept[at].index(self.mask_id)], np.int32)
        width = self.layout.content
        ex["choice_ids"] = np.zeros((len(choices), width), np.int32)
        ex["choice_mask"] = np.zeros((len(choices), width), np.int32)
        for i, t in enumerate(self._tokens([" " + c.lstrip() for c in choices])):
            if not t:
                raise DataError(f"{where}: choice {i} is empty; every choice needs text")
            t = self._one_block(t, "choice")
            ex["choice_ids"][i, : len(t)] = t
            ex["choice_mask"][i, : len(t)] = 1
        return ex

    def _answers(self, row: dict, where: str, context: str, targets: bool) -> list[tuple[str, int]] | None:
        """(text, character start) of every gold answer, checked against the context."""
        value = row.get(self.fields.answers)
        if value is None and "answer" in row:
            value = {"text": [row["answer"]], "answer_start": [row.get("answer_start")]}
        if value is None:
            if targets:
                raise DataError(
                    f"{where}: no field {self.fields.answers!r} (or 'answer' and 'answer_start'); name "
                    "the answers field with --answers-field"
                )
            return None
        if isinstance(value, list):
            value = {"text": [v.get("text") for v in value], "answer_start": [v.get("answer_start") for v in value]}
        if not isinstance(value, dict):
            raise DataError(
                f"{where}: field {self.fields.answers!r} must be SQuAD's {{'text': [...], "
                f"'answer_start': [...]}}, got {type(value).__name__}"
            )
        texts, starts = value.get("text"), value.get("answer_start")
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        starts = [starts] if isinstance(starts, int) else list(starts or [None] * len(texts))
        if not texts:
            raise DataError(f"{where}: no answer; unanswerable questions are not supported (drop the record)")
        out = []
        for text, start in zip(texts, starts + [None] * (len(texts) - len(starts))):
            text = str(text)
            found = context.find(text) if start is None else int(start)
            if not text.strip() or found < 0 or context[found : found + len(text)] != text:
                at = "" if start is None else f" at answer_start {start} (found {context[found : found + len(text)]!r})"
                raise DataError(f"{where}: answer {text!r} is not in its context{at}; fix the answer or its start")
            out.append((text, found))
        return out

    def _context_tokens(self, context: str):
        """(ids, character spans, blocks of token indices) of a context, sentences grouped into blocks."""
        if context not in self._contexts:
            sentences = split_sentences(context)
            starts, pos = [], 0
            for sentence in sentences:
                pos = context.find(sentence, pos)
                starts.append(pos)
                pos += len(sentence)
            ids_list, offsets_list = self._tokens(sentences, offsets=True)
            ids, spans, units = [], [], []
            for start, sent_ids, offs in zip(starts, ids_list, offsets_list):
                units.append(list(range(len(ids), len(ids) + len(sent_ids))))
                ids += sent_ids
                spans += [(start + a, start + b) for a, b in offs]
            self._contexts = {context: (ids, spans, self.layout.group(units))}
        return self._contexts[context]

    def _span(self, row: dict, where: str, targets: bool):
        question = self._text(row, where, self.fields.question)
        ctx_field = self.fields.context if self.fields.context in row else self.fields.text
        context = self._text(row, where, ctx_field)
        if not isinstance(context, str) or not isinstance(question, str):
            raise DataError(f"{where}: question and context must be strings")
        answers = self._answers(row, where, context, targets)
        ids, spans, block_idx = self._context_tokens(context)
        blocks = [[ids[i] for i in b] for b in block_idx]
        q = [[self._one_block(self._tokens([question])[0], "question")]]
        answer_tokens = None
        if answers:
            s, e = answers[0][1], answers[0][1] + len(answers[0][0])
            inside = [i for i, (a, b) in enumerate(spans) if b > s and a < e]
            answer_tokens = (inside[0], inside[-1])
        windows = self.layout.windows(len(blocks), q, blocks, overlap=1)
        if len(windows) > 1:
            self.report.add("context longer than the input: split into overlapping windows")
        examples, positions = [], []
        for a, b in windows:
            ex, offsets = self.layout.example([*q, blocks[a:b]], global_parts=[0])
            where_pos = {
                i: offsets[1][j] + k
                for j, blk in enumerate(block_idx[a:b])
                for k, i in enumerate(blk)
                if offsets[1][j] + k < self.layout.seq_len
            }
            span = np.full((self.layout.seq_len, 2), -1, np.int32)
            for i, p in where_pos.items():
                span[p] = spans[i]
            start = end = IGNORE_INDEX if answer_tokens is None else 0
            if answer_tokens is not None and answer_tokens[0] in where_pos and answer_tokens[1] in where_pos:
                start, end = where_pos[answer_tokens[0]], where_pos[answer_tokens[1]]
            ex.update(start_positions=np.asarray(start, np.int32), end_positions=np.asarray(end, np.int32))
            examples.append(ex)
            positions.append(span)
        return examples, positions, None if answers is None else [t for t, _ in answers], context

    def _words(self, row: dict, where: str, targets: bool):
        text = self._text(row, where)
        words = text.split() if isinstance(text, str) else list(text)
        if any(not w.strip() for w in words):
            raise DataError(f"{where}: field {self.fields.text!r} holds an empty word; drop it")
        values = self._field(row, self.fields.labels, where, targets)
        if values is not None and (not isinstance(values, list) or len(values) != len(words)):
            raise DataError(
                f"{where}: field {self.fields.labels!r} must be a list with one label per word ({len(words)} words)"
            )
        gold = None if values is None else [self.labels.index(v, where) for v in values]
        starts, pos = [], 0
        for w in words:
            starts.append(pos)
            pos += len(w) + 1
        ids, offsets = self._tokens([" ".join(words)], offsets=True)
        ends = np.asarray(starts) + np.asarray([len(w) for w in words])
        word_of = [int(np.searchsorted(ends, b - 1, side="right")) for _, b in offsets[0]]
        units = [[] for _ in words]
        for t, w in enumerate(word_of):
            units[min(w, len(words) - 1)].append(t)
        blocks_idx = self.layout.group([u for u in units if u])
        blocks = [[ids[0][t] for t in b] for b in blocks_idx]
        windows = self.layout.windows(len(blocks), [], blocks)
        if len(windows) > 1:
            self.report.add("more words than fit: split into windows")
        examples, positions = [], []
        for a, b in windows:
            ex, offs = self.layout.example([blocks[a:b]], bos_global=False)
            ex["labels"] = np.full((self.layout.seq_len,), IGNORE_INDEX, np.int32)
            pos = np.full((self.layout.seq_len,), -1, np.int32)
            for j, blk in enumerate(blocks_idx[a:b]):
                for k, t in enumerate(blk):
                    w = min(word_of[t], len(words) - 1)
                    if units[w][0] == t and offs[0][j] + k < self.layout.seq_len:
                        pos[offs[0][j] + k] = w
                        if gold is not None:
                            ex["labels"][offs[0][j] + k] = gold[w]
            examples.append(ex)
            positions.append(pos)
        return examples, positions, gold, len(words)

    def encode(self, records: Records, split: str, targets: bool = True) -> Encoded:
        """The examples of ``records``; ``targets=False`` (prediction) makes the target fields optional."""
        method: Callable = {
            "document-classification": self._document,
            "sequential-sentence-classification": self._sequence,
            "multiple-choice": self._choice,
            "question-answering": self._span,
            "token-classification": self._words,
        }[self.task]
        examples, positions, record, ids, gold, units, contexts = [], [], [], [], [], [], []
        for i, row in enumerate(records.rows):
            where = records.where(i)
            exs, pos, g, extra = method(row, where, targets)  # extra: the context (QA) or the unit count
            rid = row.get(self.fields.id)
            ids.append(str(rid) if rid is not None else f"{split}-{i}")
            gold.append(g)
            (contexts if self.task == "question-answering" else units).append(extra)
            examples += exs
            positions += pos or []
            record += [i] * len(exs)
        if len(set(ids)) < len(ids):
            dup = next(k for k, c in Counter(ids).items() if c > 1)
            raise DataError(
                f"{records.source}: id {dup!r} appears more than once; ids must be unique (field {self.fields.id!r})"
            )
        shapes = {np.shape(e["input_ids"]) for e in examples}
        if len(shapes) > 1:
            raise DataError(
                f"{records.source}: records with different numbers of choices "
                f"({sorted(s[0] for s in shapes)}); every record needs the same number"
            )
        arrays = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        return Encoded(
            self.task,
            arrays,
            np.asarray(record, np.int32),
            np.stack(positions) if positions else None,
            ids,
            gold,
            contexts if self.task == "question-answering" else None,
            None if self.task == "question-answering" else units,
        )


def limit_negative_windows(enc: Encoded, keep: int, seed: int) -> Encoded:
    """Question answering: at most ``keep`` windows without the answer per question (drawn with the seed),
    every window with it; the others are left out of training."""
    rng = np.random.default_rng(seed)
    negative = enc.arrays["start_positions"] == 0
    kept = ~negative
    for r in np.unique(enc.record):
        idx = np.nonzero(negative & (enc.record == r))[0]
        kept[rng.permutation(idx)[:keep]] = True
    return dataclasses.replace(
        enc,
        arrays={k: v[kept] for k, v in enc.arrays.items()},
        record=enc.record[kept],
        positions=None if enc.positions is None else enc.positions[kept],
    )


# ----------------------------------------------------------------------------------------------
# Batches


class _Rows(Sequence):
    """Random access to the examples of an ``Encoded`` (a grain data source)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays
        self._n = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        return {k: v[index] for k, v in self._arrays.items()}


def train_iterator(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> grain.DatasetIterator:
    """Endless, checkpointable batches of ``batch_size`` examples: shuffled anew every epoch (seeded),
    epochs following each other without a gap. ``get_state()`` / ``set_state`` resume exactly."""
    if len(_Rows(arrays)) == 0:
        raise DataError("no training examples")
    shuffle_seed = int(np.random.SeedSequence(int(seed)).generate_state(1)[0])
    ds = grain.MapDataset.source(_Rows(arrays)).shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """The examples in order, in batches of ``batch_size``; the last is filled up with copies of the first
    examples whose targets are -100 (they count nothing, and every batch has the same shape)."""
    n = len(_Rows(arrays))
    batches = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        batch = {k: v[idx] for k, v in arrays.items()}
        filler = np.arange(start, start + batch_size) >= n
        for k in TARGET_KEYS:
            if k in batch and filler.any():
                batch[k] = batch[k].copy()
                batch[k][filler] = IGNORE_INDEX
        batches.append(batch)
    return batches
