"""Prepared data: the one home of its on-disk format (written by ``train.prepare_data``, read by
``train.data``).

A prepared directory holds

- ``train-IIIII-of-NNNNN.arrayrecord``: one ArrayRecord shard per input unit (file) ``I`` of
  ``N``, one record per example, written with ``group_size:1`` (random access, as grain wants);
- ``eval.arrayrecord``: the examples of the held-out documents (``--eval-docs``), if any;
- ``train-IIIII-of-NNNNN.json``: each shard's counts, written when the shard is complete;
- ``manifest.json``: everything a reader needs (below), written last: a directory without it is
  an unfinished preparation;
- ``tokenizer/``: the tokenizer the token ids belong to.

A record is one 1-D array of token ids in the manifest's ``dtype`` (``uint16`` when the
vocabulary, the block size and the blocks per example fit in 16 bits, else ``uint32``):
``[n, length_1 .. length_n, tokens...]`` for the ``"blocks"`` layout (``n`` blocks and their
content lengths, then the content tokens without block starts or padding), the ``seq_len - 1``
tokens after ``<s>`` for ``"contiguous"``. ``RecordLayout.decode`` rebuilds the model arrays
exactly (``train.layout.expand_blocks`` / ``expand_contiguous``).

``manifest.json``: ``format``, ``format_version``, ``settings`` (tokenizer hash and special ids,
layout, sequence and block size, ``min_doc_tokens``, ``eval_docs``, ``dtype`` and the input units
with their sizes: what decides the content), ``settings_hash``, ``shards`` (per shard: file,
source unit, examples, tokens, documents read and kept, bytes), ``eval`` (the same for the
held-out file), ``totals`` and ``fingerprint`` (a hash of all of it: what a training run records
and checks on resume). A shard's byte size is checked against the manifest when it is opened, so
a truncated or missing shard is named, never read as fewer examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from train.layout import LAYOUTS, Example, expand_blocks, expand_contiguous

FORMAT = "longformer-jax/prepared-mlm"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
EVAL_FILE = "eval.arrayrecord"
WRITER_OPTIONS = "group_size:1"
TMP_SUFFIX = ".tmp"


def shard_name(index: int, count: int) -> str:
    """The file of the training shard made from input unit ``index`` of ``count``."""
    return f"train-{index:05d}-of-{count:05d}.arrayrecord"


def shard_info_name(index: int, count: int) -> str:
    """The counts of a complete shard (written once the shard is renamed into place)."""
    return f"train-{index:05d}-of-{count:05d}.json"


def canonical_hash(obj: Any) -> str:
    """A short sha256 of ``obj``'s canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as JSON to a temporary name, then renames it to ``path``."""
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"
    Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def token_dtype(vocab_size: int, seq_len: int, block_size: int) -> str:
    """``uint16`` when token ids, block lengths and block counts fit in 16 bits, else ``uint32``."""
    return "uint16" if max(vocab_size - 1, block_size, seq_len // max(block_size, 1)) < 2**16 else "uint32"


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """How records encode examples: the layout, its sizes, the special ids and the token dtype."""

    layout: str
    seq_len: int
    block_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    dtype: str

    def __post_init__(self):
        if self.layout not in LAYOUTS or self.dtype not in ("uint16", "uint32"):
            raise ValueError(f"bad record layout {self}: layout must be one of {LAYOUTS}, dtype uint16 or uint32")

    def encode_blocks(self, blocks: list[list[int]]) -> bytes:
        """A ``"blocks"`` record from an example's blocks (token id lists)."""
        head = [len(blocks), *(len(b) for b in blocks)]
        return np.asarray(head + [t for b in blocks for t in b], self.dtype).tobytes()

    def encode_contiguous(self, tokens: list[int]) -> bytes:
        """A ``"contiguous"`` record from the ``seq_len - 1`` tokens after ``<s>``."""
        return np.asarray(tokens, self.dtype).tobytes()

    def decode(self, record: bytes) -> Example:
        """The example arrays (``train.layout.MODEL_KEYS``, int32, (seq_len,)) of a record."""
        values = np.frombuffer(record, self.dtype)
        if self.layout == "contiguous":
            return expand_contiguous(values, bos_id=self.bos_id)
        n = int(values[0])
        return expand_blocks(
            values[1 : 1 + n],
            values[1 + n :],
            seq_len=self.seq_len,
            block_size=self.block_size,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
        )

    def content_tokens(self, record: bytes) -> int:
        """The number of content tokens (no block starts, no padding) a record holds."""
        values = np.frombuffer(record, self.dtype)
        return len(values) if self.layout == "contiguous" else len(values) - 1 - int(values[0])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RecordWriter:
    """An ArrayRecord file written under a temporary name; ``commit()`` renames it into place.

    As a context manager, a body that raises leaves no file behind (the temporary one is removed).
    """

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = Path(path)
        self.tmp = Path(f"{path}{TMP_SUFFIX}")
        self._writer = ArrayRecordWriter(str(self.tmp), WRITER_OPTIONS)
        self.count = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def commit(self) -> int:
        """Closes the file, renames it to its final name; returns its size in bytes."""
        self._writer.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        if self._writer.is_open():
            self._writer.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A prepared directory's ``manifest.json``, read and checked (``read_manifest``)."""

    directory: Path
    content: dict[str, Any]

    @property
    def settings(self) -> dict[str, Any]:
        return self.content["settings"]

    @property
    def fingerprint(self) -> str:
        return self.content["fingerprint"]

    @property
    def record_layout(self) -> RecordLayout:
        return RecordLayout(**self.settings["record_layout"])

    @property
    def tokenizer_hash(self) -> str:
        return self.settings["tokenizer"]["sha256"]

    @property
    def num_train(self) -> int:
        return int(self.content["totals"]["train_examples"])

    @property
    def num_eval(self) -> int:
        return int(self.content["eval"]["examples"]) if self.content.get("eval") else 0

    def train_files(self) -> list[tuple[Path, int]]:
        """(path, examples) of every training shard that holds examples, in unit order."""
        return [(self.directory / s["file"], int(s["examples"])) for s in self.content["shards"] if s["examples"]]

    def eval_file(self) -> tuple[Path, int] | None:
        ev = self.content.get("eval")
        return (self.directory / ev["file"], int(ev["examples"])) if ev and ev["examples"] else None

    def check_files(self) -> None:
        """A ``ValueError`` naming the shard when one is missing or not of its recorded size."""
        entries = [s for s in self.content["shards"] if s["examples"]]
        if self.content.get("eval") and self.content["eval"]["examples"]:
            entries.append(self.content["eval"])
        for entry in entries:
            path = self.directory / entry["file"]
            redo = (
                f"prepare it again (rerun the train.prepare_data command that made {self.directory}: it "
                "rewrites every shard that is missing or incomplete), or restore the file"
            )
            if not path.is_file():
                raise ValueError(f"prepared data {self.directory}: shard {entry['file']} is missing; {redo}")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise ValueError(
                    f"prepared data {self.directory}: shard {entry['file']} is truncated or damaged ({size:,} bytes, "
                    f"the manifest says {entry['bytes']:,}); {redo}"
                )


def is_prepared(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory with a ``manifest.json`` (prepared data)."""
    return (Path(path) / MANIFEST).is_file()


def looks_prepared(path: str | os.PathLike) -> bool:
    """True when ``path`` is prepared data or an unfinished preparation (shards, no manifest yet)."""
    path = Path(path)
    return is_prepared(path) or (path.is_dir() and any(path.glob("train-*-of-*.*")))


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a prepared directory; a ``ValueError`` naming the fix if it is absent or foreign."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{directory} holds no {MANIFEST}: not prepared data, or a preparation that has not finished "
            "(rerun python -m train.prepare_data with the same arguments to complete it)"
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); prepare the data again") from e
    if content.get("format") != FORMAT or content.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a {FORMAT} manifest of version {FORMAT_VERSION} (found {content.get('format')!r} "
            f"version {content.get('format_version')!r}); prepare the data again with this version"
        )
    return Manifest(directory, content)
