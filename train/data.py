"""The MLM input pipeline: corpus -> tokenizer -> laid-out examples -> masked, batched iterator.

```python
docs = data.read_documents("builtin:python-docs")           # or a path, or "hf:allenai/c4:en"
tok = data.train_demo_tokenizer(docs, "runs/demo/tokenizer")  # or data.load_tokenizer("roberta-base")
examples = data.build_examples(data.read_documents(spec), tok, layout="blocks", seq_len=4096)
train_ex, eval_ex = data.split_examples(examples, 0.05, seed=42)
it = data.make_train_iterator(train_ex, tok, data.Batching(batch_size=16, seed=42))
batch = next(it)      # input_ids, attention_mask, global_attention_mask, labels: (16, 4096) int32
state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes exactly there
```

Examples are built once, in memory, as int32 arrays (N, L) (``load_or_build_examples`` caches
them as a ``.npz`` file); ``doc_index`` (N,) records the document each example came from, so
that the evaluation split holds out whole documents. How a document becomes examples (the
``"blocks"`` and ``"contiguous"`` layouts) is ``train.layout``; this module tokenizes, drops
documents with fewer than ``min_doc_words`` words (split on whitespace; 1024 in the seed
recipe) and stacks what the layout returns.

The training iterator is a grain ``MapDataset`` pipeline: seeded shuffle, endless repeat
(each epoch shuffled anew), RoBERTa masking as a random map (seeded by the seed and the
example's position in the stream: fresh per step, reproducible), batch, then the host's share
of every global batch. Its state is one integer (``get_state()`` is JSON), so a restored run
sees exactly the batches the uninterrupted one would have seen; the trainer's checkpoints
store that state beside the train state (``train.checkpoint``, one JSON file per process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from longformer_jax.losses import IGNORE_INDEX
from train.corpus import BUILTIN_PYTHON_DOCS, parse_hf_spec, python_docs_corpus, read_documents
from train.layout import MODEL_KEYS, check_layout, contiguous_examples, document_blocks_examples, split_sentences
from train.masking import MaskingSpec, mask_tokens

__all__ = [
    "BUILTIN_PYTHON_DOCS",
    "Batching",
    "IGNORE_INDEX",
    "MODEL_KEYS",
    "MaskingSpec",
    "TokenIds",
    "build_examples",
    "examples_fingerprint",
    "load_or_build_examples",
    "load_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "mask_tokens",
    "masking_spec",
    "parse_hf_spec",
    "python_docs_corpus",
    "read_documents",
    "split_examples",
    "token_ids",
    "has_tokenizer_files",
    "train_demo_tokenizer",
]

logger = logging.getLogger(__name__)

DOC_KEY = "doc_index"
ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0, 1, 2, 3, 4
SEED_MIN_DOC_WORDS = 1024
RUN_TOKENIZER_DIR = "tokenizer"  # RUN_DIR/tokenizer: the tokenizer a run used (trained or copied there)
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The special ids the pipeline uses, read from a tokenizer."""

    bos: int  # <s>: first token of an example
    eos: int  # </s>: block start, document separator
    pad: int
    mask: int
    vocab_size: int  # len(tokenizer), added tokens included
    special: np.ndarray  # every special id: never masked, never drawn as a random token


def token_ids(tok: Any) -> TokenIds:
    """The special ids of ``tok``; a ``ValueError`` naming the tokenizer if one is missing."""
    name = getattr(tok, "name_or_path", None) or type(tok).__name__
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    missing = [
        what
        for what, value in (
            ("mask token (<mask>)", tok.mask_token_id),
            ("pad token (<pad>)", tok.pad_token_id),
            ("bos/cls token (<s>)", bos),
            ("eos/sep token (</s>)", eos),
        )
        if value is None
    ]
    if missing:
        raise ValueError(
            f"tokenizer {name!r} has no {' and no '.join(missing)}, which MLM pretraining needs; "
            "use a RoBERTa-style tokenizer (e.g. --tokenizer roberta-base, or one made by "
            "train_demo_tokenizer), or add the tokens, e.g. tok.add_special_tokens({'mask_token': "
            "'<mask>', 'pad_token': '<pad>'}), and grow the model's embeddings to match"
        )
    special = sorted(set(tok.all_special_ids) | {bos, eos, tok.pad_token_id, tok.mask_token_id})
    return TokenIds(
        bos=int(bos), eos=int(eos), pad=int(tok.pad_token_id), mask=int(tok.mask_token_id),
        vocab_size=len(tok), special=np.asarray(special, np.int32),
    )


def masking_spec(tok: Any, mlm_probability: float = 0.15) -> MaskingSpec:
    """RoBERTa's masking for ``tok``: random replacements drawn from its non-special ids."""
    ids = token_ids(tok)
    random_ids = np.setdiff1d(np.arange(ids.vocab_size, dtype=np.int32), ids.special)
    return MaskingSpec(
        mask_id=ids.mask, special_ids=ids.special, random_ids=random_ids.astype(np.int32),
        mlm_probability=mlm_probability,
    )


def load_tokenizer(path_or_id: str, *, model_max_length: int | None = None, **kwargs) -> Any:
    """A ``transformers`` fast tokenizer from a local directory or a hub id, checked for MLM.

    Args:
      path_or_id: a directory holding ``tokenizer.json``/``tokenizer_config.json`` (or the
        vocab/merges files), or a hub id such as ``roberta-base`` (needs network once).
      model_max_length: overrides the tokenizer's limit (the seed's tokenizer says 512; a
        4096-token Longformer needs 4096).
      **kwargs: passed to ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load tokenizer {str(path_or_id)!r} ({type(e).__name__}: {e}); pass a directory "
            "with tokenizer files (tokenizer.json) or a hub id such as roberta-base (needs network)"
        ) from e
    if model_max_length is not None:
        tok.model_max_length = int(model_max_length)
    token_ids(tok)
    return tok


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a saved ``transformers`` tokenizer."""
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def train_demo_tokenizer(
    texts: Iterable[str],
    out_dir: str,
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    model_max_length: int = 4096,
) -> Any:
    """Trains a byte-level BPE with RoBERTa's special tokens and saves it as an HF tokenizer.

    The tokenizer has ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4 (``<mask>``
    swallows the space before it, as RoBERTa's), no prefix space, and RoBERTa's
    post-processor (``<s> A </s>``, pairs ``<s> A </s></s> B </s>``). ``out_dir`` then loads
    with ``AutoTokenizer.from_pretrained``; the loaded tokenizer is returned.

    Args:
      texts: training text (e.g. ``read_documents("builtin:python-docs")``).
      out_dir: directory written with ``tokenizer.json`` and ``tokenizer_config.json``.
      vocab_size: size of the vocabulary, the 5 special tokens and 256 bytes included.
      min_frequency: a merge needs at least this many occurrences.
      model_max_length: the length the tokenizer reports as its limit.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    min_vocab = len(ROBERTA_SPECIAL_TOKENS) + 256
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is below {min_vocab} (256 bytes + 5 special tokens); use e.g. 8192"
        )
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, single_word=False, normalized=False, special=True)
    specials = [*ROBERTA_SPECIAL_TOKENS[:-1], mask]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(iter(texts), trainer=trainer)
    for i, t in enumerate(ROBERTA_SPECIAL_TOKENS):
        if bpe.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {bpe.token_to_id(t)}, expected {i}")
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")),
        trim_offsets=True, add_prefix_space=False,
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token=mask, model_max_length=model_max_length,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def _encode(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added, no truncation."""
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _DocCounts:
    """What ``_kept_documents`` saw, for the error when no example comes out."""

    read: int = 0
    kept: int = 0
    longest: int = 0


def _kept_documents(docs: Iterable[str], min_doc_words: int, max_docs: int | None, counts: _DocCounts):
    """The documents with at least ``min_doc_words`` words, at most ``max_docs`` of them."""
    for doc in docs:
        counts.read += 1
        words = len(doc.split())
        counts.longest = max(counts.longest, words)
        if words < min_doc_words:
            continue
        counts.kept += 1
        yield doc
        if max_docs is not None and counts.kept >= max_docs:
            return


def _no_example_error(counts: _DocCounts, layout: str, seq_len: int, min_doc_words: int, min_blocks: int):
    if counts.read == 0:
        return ValueError("no documents given to build_examples; check the --data corpus")
    if counts.kept == 0:
        return ValueError(
            f"no document long enough: {counts.read} documents read, none with at least "
            f"min_doc_words={min_doc_words} words (the longest has {counts.longest}); lower "
            "--min-doc-words or use a corpus of longer documents"
        )
    return ValueError(
        f"the {counts.kept} kept documents make no {layout!r} example of seq_len={seq_len} "
        + ("(the corpus holds fewer tokens than one example); " if layout == "contiguous"
           else f"(each has fewer than min_blocks={min_blocks} blocks); ")
        + "lower --seq-len, add documents, or lower --min-doc-words"
    )


def build_examples(
    docs: Iterable[str],
    tok: Any,
    layout: str = "blocks",
    seq_len: int = 4096,
    block_size: int = 128,
    min_doc_words: int | None = None,
    max_docs: int | None = None,
    *,
    min_blocks: int = 1,
) -> dict[str, np.ndarray]:
    """Tokenizes documents and lays them out as fixed-length examples (``train.layout``).

    Args:
      docs: document strings (e.g. ``read_documents(spec)``).
      tok: a tokenizer with ``<s>``, ``</s>``, ``<pad>``, ``<mask>`` (``load_tokenizer``).
      layout: ``"blocks"`` (sentence blocks, the seed's) or ``"contiguous"``; see ``train.layout``.
      seq_len: example length L (a multiple of ``block_size`` for ``"blocks"``).
      block_size: tokens per block, block start included (128 in the seed recipe).
      min_doc_words: documents with fewer whitespace-separated words are dropped. Default:
        1024 (the seed recipe) for ``"blocks"``, 0 for ``"contiguous"``.
      max_docs: stop after this many kept documents (needed for endless streaming corpora).
      min_blocks: ``"blocks"`` only: the last example of a document is kept only if it holds
        at least this many blocks.

    Returns:
      ``input_ids``, ``attention_mask``, ``global_attention_mask``: (N, L) int32;
      ``doc_index``: (N,) int32, the position of the source document among the kept ones.
    """
    check_layout(layout, seq_len, block_size, min_blocks)
    if min_doc_words is None:
        min_doc_words = SEED_MIN_DOC_WORDS if layout == "blocks" else 0
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs={max_docs} must be at least 1 (or None for all)")
    ids = token_ids(tok)
    counts = _DocCounts()
    kept = _kept_documents(docs, min_doc_words, max_docs, counts)
    if layout == "blocks":
        sizes = dict(seq_len=seq_len, block_size=block_size, bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad)
        rows = [(i, ex) for i, doc in enumerate(kept)
                for ex in document_blocks_examples(_encode(tok, split_sentences(doc)), min_blocks=min_blocks,
                                                   **sizes)]
    else:
        tokens = (_encode(tok, [doc])[0] for doc in kept)
        rows = list(contiguous_examples(tokens, seq_len=seq_len, bos_id=ids.bos, eos_id=ids.eos))
    if not rows:
        raise _no_example_error(counts, layout, seq_len, min_doc_words, min_blocks)
    out = {k: np.stack([ex[k] for _, ex in rows]) for k in MODEL_KEYS}
    out[DOC_KEY] = np.asarray([i for i, _ in rows], np.int32)
    logger.info(
        "built %d %s examples of length %d from %d of %d documents",
        len(rows), layout, seq_len, counts.kept, counts.read,
    )
    return out


def _spec_fingerprint(spec: str) -> dict[str, Any]:
    """What identifies a corpus's content cheaply: files with sizes and mtimes, or the name."""
    if spec == BUILTIN_PYTHON_DOCS:
        return {"spec": spec, "python": sys.version}
    if spec.startswith("hf:") or not os.path.exists(spec):
        return {"spec": spec}
    if os.path.isfile(spec):
        paths = [spec]
    else:
        paths = sorted(os.path.join(r, n) for r, _, ns in os.walk(spec) for n in ns)
    return {"spec": os.path.abspath(spec),
            "files": [[os.path.relpath(p, spec), os.path.getsize(p), os.path.getmtime(p)] for p in paths]}


def load_or_build_examples(
    spec: str,
    tok: Any,
    cache_dir: str | None = None,
    *,
    read_kwargs: dict[str, Any] | None = None,
    **build_kwargs,
) -> dict[str, np.ndarray]:
    """``build_examples(read_documents(spec), tok, ...)``, cached in ``cache_dir`` as ``.npz``.

    The cache file's name is a hash of the corpus (spec; for local paths every file's size and
    modification time), the tokenizer (its full serialisation) and the build arguments, so a
    change to any of them builds anew. ``cache_dir=None`` builds without caching.
    """
    read_kwargs = dict(read_kwargs or {})
    if cache_dir is None:
        return build_examples(read_documents(spec, **read_kwargs), tok, **build_kwargs)
    backend = getattr(tok, "backend_tokenizer", None)
    tok_repr = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    key_src = json.dumps(
        {"format": _CACHE_FORMAT, "corpus": _spec_fingerprint(str(spec)), "read": read_kwargs,
         "build": build_kwargs, "tokenizer": hashlib.sha256(tok_repr.encode()).hexdigest(),
         "special": [tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token]},
        sort_keys=True, default=str,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"examples-{key}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            logger.info("examples loaded from %s", path)
            return {k: f[k] for k in (*MODEL_KEYS, DOC_KEY)}
    examples = build_examples(read_documents(spec, **read_kwargs), tok, **build_kwargs)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **examples)
    os.replace(tmp, path)
    with open(os.path.join(cache_dir, f"examples-{key}.json"), "w") as f:
        f.write(key_src)
    return examples


def examples_fingerprint(examples: dict[str, np.ndarray]) -> str:
    """A short hash of the examples' content: store it with a run, compare it on resume."""
    h = hashlib.sha256()
    for k in MODEL_KEYS:
        a = np.ascontiguousarray(examples[k], np.int32)
        h.update(k.encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def split_examples(
    examples: dict[str, np.ndarray],
    eval_size: float | int = 0.05,
    seed: int = 0,
    *,
    by_document: bool = True,
    eval_fraction: float | None = None,
    eval_examples: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Splits examples into (train, eval), holding out whole documents where possible.

    Args:
      examples: ``build_examples`` output.
      eval_size: a float in [0, 1): the share of examples for evaluation; an int >= 1: their
        number.
      seed: decides which documents (or examples) are held out.
      by_document: hold out whole documents (their examples), chosen at random, until the
        target is reached without exceeding it (if no document fits, the smallest one is
        taken); falls back to single examples when there is one document (or
        ``doc_index`` is missing). Both parts keep the original example order.
      eval_fraction, eval_examples: keyword spellings of ``eval_size`` as a share or a count
        (at most one of them).
    """
    if eval_fraction is not None and eval_examples is not None:
        raise ValueError("give eval_fraction or eval_examples, not both")
    if eval_fraction is not None:
        eval_size = float(eval_fraction)
    elif eval_examples is not None:
        eval_size = int(eval_examples)
    n = len(examples["input_ids"])
    if isinstance(eval_size, float) and not 0.0 <= eval_size < 1.0:
        raise ValueError(f"eval_size={eval_size} as a fraction must lie in [0, 1); e.g. 0.05")
    target = int(round(eval_size * n)) if isinstance(eval_size, float) else int(eval_size)
    if isinstance(eval_size, float) and eval_size > 0:
        target = max(target, 1)
    if target < 0 or (target >= n and target > 0):
        raise ValueError(
            f"eval_size={eval_size} asks for {target} evaluation examples out of {n}; "
            "at least one must stay for training: lower the evaluation size or add data"
        )
    rng = np.random.default_rng(seed)
    is_eval = np.zeros((n,), bool)
    doc = examples.get(DOC_KEY)
    if target > 0 and by_document and doc is not None and len(np.unique(doc)) > 1:
        docs, counts = np.unique(doc, return_counts=True)
        taken = 0
        for i in rng.permutation(len(docs)):
            if taken + counts[i] <= target and taken + counts[i] < n:
                is_eval |= doc == docs[i]
                taken += counts[i]
            if taken >= target:
                break
        if taken == 0:
            is_eval |= doc == docs[np.argmin(counts)]
    elif target > 0:
        is_eval[rng.permutation(n)[:target]] = True
    train = {k: v[~is_eval] for k, v in examples.items()}
    evaluation = {k: v[is_eval] for k, v in examples.items()}
    return train, evaluation


# --------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------


class _ExampleSource(Sequence):
    """Random access to the rows of an examples dict (a grain data source)."""

    def __init__(self, examples: dict[str, np.ndarray]):
        missing = [k for k in MODEL_KEYS if k not in examples]
        if missing:
            raise ValueError(f"examples lack {missing}; build them with build_examples")
        self._arrays = {k: np.asarray(examples[k], np.int32) for k in MODEL_KEYS}
        self._n = len(self._arrays["input_ids"])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        return {k: v[index] for k, v in self._arrays.items()}


@dataclasses.dataclass(frozen=True)
class _MaskTransform(grain.transforms.RandomMap):
    spec: MaskingSpec

    def random_map(self, element, rng: np.random.Generator):
        return mask_tokens(element, rng, self.spec)


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (shuffle, masking) from the user's seed."""
    shuffle_seed, mask_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(shuffle_seed), int(mask_seed)


@dataclasses.dataclass(frozen=True)
class Batching:
    """How this host batches and masks examples.

    Attributes:
      batch_size: rows per batch on this host (the global batch is ``batch_size * shard_count``).
      seed: decides the shuffling and the masking.
      mlm_probability: RoBERTa masking's chance that a token is chosen.
      shard_index, shard_count: this host among all (``jax.process_index()``, ``jax.process_count()``).
    """

    batch_size: int
    seed: int
    mlm_probability: float = 0.15
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


def make_train_iterator(
    train_ex: dict[str, np.ndarray], tok: Any, batching: Batching, *, num_threads: int = 1, prefetch: int = 4
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this host's masked training batches.

    The examples are shuffled with ``batching.seed`` (anew each epoch, epochs follow each other
    without a gap), masked with RoBERTa's rule seeded by the seed and the example's position
    in the stream, and grouped into global batches of ``batch_size * shard_count``; this host
    (``shard_index`` of ``shard_count``) gets its ``batch_size`` rows of each. So the global
    batches do not depend on the number of hosts.

    Each batch: ``input_ids``, ``attention_mask``, ``global_attention_mask``, ``labels``,
    int32 arrays (batch_size, L), labels -100 where no loss.

    The iterator is grain's ``DatasetIterator``: ``get_state()`` is a small JSON-serialisable
    dict (the position in the stream) and ``set_state(state)`` on an iterator made with the
    same arguments continues exactly there. The trainer's ``train.checkpoint.Checkpointer``
    stores that dict beside the train state, one ``data/process_<i>-of-<n>.json`` per host,
    snapshotted when the save starts.

    Args:
      num_threads: threads preparing batches ahead (0: none, batches made on ``next``).
      prefetch: batches prepared ahead.
    """
    source = _ExampleSource(train_ex)
    if len(source) == 0:
        raise ValueError(
            "no training examples: the evaluation split took them all; lower the evaluation size"
        )
    shuffle_seed, mask_seed = _seeds(batching.seed)
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=shuffle_seed)
        .repeat(None)
        .random_map(_MaskTransform(masking_spec(tok, batching.mlm_probability)), seed=mask_seed)
        .batch(batching.batch_size, drop_remainder=True)
    )
    # Batch k of the stream goes to host k % shard_count: global batch t (batches
    # t * shard_count ... t * shard_count + shard_count - 1, hosts in order) is the same
    # stream of examples whatever the number of hosts.
    if batching.shard_count > 1:
        ds = ds[batching.shard_index :: batching.shard_count]
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(read_options))


def make_eval_batches(
    eval_ex: dict[str, np.ndarray], tok: Any, batching: Batching, *, pad_last: bool = True
) -> list[dict[str, np.ndarray]]:
    """Evaluation batches with a fixed masking (the same at every evaluation).

    Example i is masked with a generator seeded by (``batching.seed``, i), so the batches depend
    only on the examples and the seed. Global batches hold ``batch_size * shard_count`` examples
    in order; this host gets its ``batch_size`` rows of each. With ``pad_last`` the last global
    batch is filled up with copies of the first examples whose labels are all -100 (they add
    nothing to the loss and keep every batch the same shape); without it, the last batch may
    be smaller.
    """
    source = _ExampleSource(eval_ex)
    n = len(source)
    if n == 0:
        return []
    spec = masking_spec(tok, batching.mlm_probability)
    rows = [mask_tokens(source[i], np.random.default_rng([int(batching.seed), i]), spec) for i in range(n)]
    shard_index, shard_count = batching.shard_index, batching.shard_count
    global_batch = batching.batch_size * shard_count
    n_pad = (-n) % global_batch if pad_last else 0
    for i in range(n_pad):
        filler = dict(rows[i % n])
        filler["labels"] = np.full_like(filler["labels"], IGNORE_INDEX)
        rows.append(filler)
    batches = []
    for start in range(0, len(rows), global_batch):
        chunk = rows[start : start + global_batch]
        per_host = -(-len(chunk) // shard_count)
        mine = chunk[shard_index * per_host : (shard_index + 1) * per_host]
        if mine:
            batches.append({k: np.stack([r[k] for r in mine]) for k in (*MODEL_KEYS, "labels")})
    return batches

