"""The training input pipeline: prepared shards -> grain -> masked batches of this host's rows.

```python
prepared = data.open_prepared("data/c4", tok)          # manifest read, shard sizes and tokenizer checked
spec = data.masking_spec(tok, 0.15)
it = data.make_train_iterator(prepared, spec, data.Batching(batch_size=16, seed=42))
batch = next(it)        # input_ids, attention_mask, global_attention_mask, labels: (16, L);
                        # masked_positions, masked_labels: (16, K), the LM head's slots (train.masking)
state = it.get_state()  # {"examples_seen": N}: it.set_state(state) continues at global example N
evals = data.make_eval_batches(prepared, spec, data.Batching(16, seed=42), max_batches=8)
```

The data are prepared once by ``train.prepare_data`` (``train.records`` is the format); a raw-text
corpus given to the training program is prepared into its run directory by the same code. The
training stream is a grain ``MapDataset`` over the shards' ``ArrayRecordDataSource``: a global
index shuffle (grain's, O(1) memory; each epoch shuffled anew, epochs back to back), records
decoded into the layout's arrays, RoBERTa masking as a random map seeded by the seed and the
example's global position (fresh at every step, reproducible), then batches. Global batch ``t``
holds the examples ``t*G .. t*G + G - 1`` of that stream (``G = batch_size * shard_count``);
host ``shard_index`` reads only its ``batch_size`` consecutive rows of each, so the global batches
do not depend on the number of hosts. Nothing proportional to the corpus is held in memory.

The position is one integer, the examples consumed globally (``get_state()``), so a run resumed
with another number of processes continues at the same global example. The trainer's
checkpoints store it beside the train state (``train.checkpoint``). Every field that masking
returns is batched and passed on: with ``train.masking``'s static slots (``masked_positions`` /
``masked_labels``, K per row) the MLM objective runs the LM head only at the masked positions.
Evaluation filler rows carry -100 in every label field, so they count nothing.

Tokenizers (``load_tokenizer``, ``token_ids``, ``train_demo_tokenizer``) are ``train.tokenizer``'s
and corpora (``read_documents``) ``train.corpus``'s; both are importable from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grain
import numpy as np

from longformer_jax.losses import IGNORE_INDEX
from train.corpus import BUILTIN_PYTHON_DOCS, parse_hf_spec, python_docs_corpus, read_documents
from train.layout import MODEL_KEYS
from train.masking import MaskingSpec, mask_tokens
from train.records import TOKENIZER_DIR, Manifest, RecordLayout, is_prepared, looks_prepared, read_manifest
from train.tokenizer import (
    ROBERTA_SPECIAL_TOKENS,
    TokenIds,
    has_tokenizer_files,
    load_tokenizer,
    token_ids,
    tokenizer_hash,
    train_demo_tokenizer,
)

__all__ = [
    "BUILTIN_PYTHON_DOCS",
    "Batching",
    "IGNORE_INDEX",
    "MODEL_KEYS",
    "Manifest",
    "MaskingSpec",
    "ROBERTA_SPECIAL_TOKENS",
    "TOKENIZER_DIR",
    "TokenIds",
    "TrainIterator",
    "has_tokenizer_files",
    "is_prepared",
    "looks_prepared",
    "load_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "mask_tokens",
    "masking_spec",
    "open_prepared",
    "parse_hf_spec",
    "python_docs_corpus",
    "read_documents",
    "token_ids",
    "train_demo_tokenizer",
]

RUN_TOKENIZER_DIR = "tokenizer"  # RUN_DIR/tokenizer: the tokenizer a run used (trained or copied there)
RUN_DATA_DIR = "data"  # RUN_DIR/data: a raw-text --data, prepared


def masking_spec(tok: Any, mlm_probability: float = 0.15) -> MaskingSpec:
    """RoBERTa's masking for ``tok``: random replacements drawn from its non-special ids."""
    ids = token_ids(tok)
    random_ids = np.setdiff1d(np.arange(ids.vocab_size, dtype=np.int32), ids.special)
    return MaskingSpec(
        mask_id=ids.mask,
        special_ids=ids.special,
        random_ids=random_ids.astype(np.int32),
        mlm_probability=mlm_probability,
    )


def open_prepared(
    directory: str | Path,
    tok: Any = None,
    *,
    layout: str | None = None,
    seq_len: int | None = None,
    block_size: int | None = None,
) -> Manifest:
    """A prepared directory's manifest, checked: every shard present at its recorded size, made with
    ``tok`` (when given), and of the given layout sizes (when given); a ``ValueError`` naming the fix."""
    manifest = read_manifest(directory)
    manifest.check_files()
    if tok is not None and tokenizer_hash(tok) != manifest.tokenizer_hash:
        made_with = manifest.content.get("tokenizer_name") or "?"
        raise ValueError(
            f"prepared data {directory} was made with another tokenizer ({made_with!r}, sha256 "
            f"{manifest.tokenizer_hash[:12]}) than {getattr(tok, 'name_or_path', '') or 'the one given'!r} (sha256 "
            f"{tokenizer_hash(tok)[:12]}); train with the tokenizer it was made with ({Path(directory) / 'tokenizer'})"
            ", or prepare the data again with --tokenizer set to this one"
        )
    rl = manifest.record_layout
    wanted = {"layout": layout, "seq_len": seq_len, "block_size": block_size if rl.layout == "blocks" else None}
    wrong = {k: v for k, v in wanted.items() if v is not None and getattr(rl, k) != v}
    if wrong:
        shown = ", ".join(f"--{k.replace('_', '-')} {getattr(rl, k)} (not {v})" for k, v in wrong.items())
        raise ValueError(
            f"prepared data {directory} was made with {shown}; train with those settings, or prepare "
            "the data again with yours"
        )
    return manifest


@dataclasses.dataclass(frozen=True)
class Batching:
    """How this host batches examples.

    Attributes:
      batch_size: rows per batch on this host (the global batch is ``batch_size * shard_count``).
      seed: decides the shuffling and the masking.
      shard_index, shard_count: this host among all (``jax.process_index()``, ``jax.process_count()``).
    """

    batch_size: int
    seed: int
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(
                f"shard_index={self.shard_index} must lie in [0, shard_count={self.shard_count}); "
                "pass jax.process_index() and jax.process_count()"
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.shard_count


@dataclasses.dataclass(frozen=True)
class _Decode(grain.transforms.Map):
    layout: RecordLayout

    def map(self, element: bytes) -> dict[str, np.ndarray]:
        return self.layout.decode(element)


@dataclasses.dataclass(frozen=True)
class _Mask(grain.transforms.RandomMap):
    spec: MaskingSpec

    def random_map(self, element, rng: np.random.Generator):
        return mask_tokens(element, rng, self.spec)


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (shuffle, masking) from the user's seed."""
    shuffle_seed, mask_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(shuffle_seed), int(mask_seed)


def _source(files: list[tuple[Path, int]]) -> grain.sources.ArrayRecordDataSource:
    # "path[0:n]": the manifest's counts, so no file is opened before it is read.
    return grain.sources.ArrayRecordDataSource([f"{path}[0:{n}]" for path, n in files])


class TrainIterator:
    """This host's endless training batches; the position is the examples consumed globally.

    ``get_state()`` is ``{"examples_seen": N}`` (JSON); ``set_state`` with such a state, made by
    any number of hosts with the same global batch, continues at global example ``N``.
    """

    def __init__(self, batches: grain.MapDataset, batching: Batching, read_options: grain.ReadOptions):
        self._batches, self.batching, self._read_options = batches, batching, read_options
        self._start(0)

    def _start(self, global_batch: int) -> None:
        b = self.batching
        self._next = global_batch
        mine = self._batches[global_batch * b.shard_count + b.shard_index :: b.shard_count]
        self._it = iter(mine.to_iter_dataset(self._read_options))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"examples_seen": self._next * self.batching.global_batch_size}

    def set_state(self, state: dict[str, Any]) -> None:
        g = self.batching.global_batch_size
        seen = state.get("examples_seen") if isinstance(state, dict) else None
        if not isinstance(seen, int) or seen < 0 or seen % g:
            raise ValueError(
                f"data position {state!r} is not a count of examples consumed in whole global batches of {g}; "
                "the checkpoint was written by another version or with another batch size: resume with the "
                "settings it was made with, or start a new run"
            )
        self._start(seen // g)


def make_train_iterator(
    prepared: Manifest, spec: MaskingSpec, batching: Batching, *, num_threads: int = 1, prefetch: int = 4
) -> TrainIterator:
    """An endless, checkpointable iterator of this host's masked training batches (module docstring).

    Each batch holds every field of a masked example (``input_ids``, ``attention_mask``,
    ``global_attention_mask``, ``labels``, and whatever else ``mask_tokens`` returns), stacked:
    (batch_size, ...) arrays.

    Args:
      prepared: ``open_prepared``'s manifest.
      spec: the masking (``masking_spec``).
      batching: this host's batch size, the seed, and this host among all (``Batching``).
      num_threads: threads preparing batches ahead (0: none, batches made on ``next``).
      prefetch: batches prepared ahead.
    """
    files = prepared.train_files()
    if not files:
        raise ValueError(f"prepared data {prepared.directory} holds no training example; prepare a larger corpus")
    shuffle_seed, mask_seed = _seeds(batching.seed)
    batches = (
        grain.MapDataset.source(_source(files))
        .shuffle(seed=shuffle_seed)
        .repeat(None)
        .map(_Decode(prepared.record_layout))
        .random_map(_Mask(spec), seed=mask_seed)
        .batch(batching.batch_size, drop_remainder=True)
    )
    return TrainIterator(batches, batching, grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def _filler(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of ``row`` that adds nothing to a loss: every ``labels`` / ``*_labels`` field -100."""
    return {k: np.full_like(v, IGNORE_INDEX) if k == "labels" or k.endswith("_labels") else v for k, v in row.items()}


def make_eval_batches(
    prepared: Manifest,
    spec: MaskingSpec,
    batching: Batching,
    *,
    max_batches: int | None = None,
    pad_last: bool = True,
) -> list[dict[str, np.ndarray]]:
    """This host's evaluation batches from the held-out file, with a fixed masking.

    Example i is masked with a generator seeded by (``batching.seed``, i), so the batches depend
    only on the examples and the seed. Global batches hold ``batch_size * shard_count`` examples
    in order (at most ``max_batches`` of them); this host gets its ``batch_size`` rows of each.
    With ``pad_last`` the last global batch is filled up with copies of the first examples whose
    labels are all -100 (they add nothing to the loss and keep every batch the same shape);
    without it, the last batch may be smaller. No held-out file: no batch.
    """
    held_out = prepared.eval_file()
    if held_out is None:
        return []
    g = batching.global_batch_size
    n = held_out[1] if max_batches is None else min(held_out[1], max_batches * g)
    source, layout = _source([(held_out[0], n)]), prepared.record_layout

    def row(i: int) -> dict[str, np.ndarray]:
        masked = mask_tokens(layout.decode(source[i % n]), np.random.default_rng([int(batching.seed), i % n]), spec)
        return masked if i < n else _filler(masked)

    total = n + ((-n) % g if pad_last else 0)
    batches = []
    for start in range(0, total, g):
        size = min(g, total - start)
        per_host = -(-size // batching.shard_count)
        mine = range(
            start + batching.shard_index * per_host, min(start + size, start + (batching.shard_index + 1) * per_host)
        )
        rows = [row(i) for i in mine]
        if rows:
            batches.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return batches
