"""Tokenizers of the training programs: the one home of loading, checking and training them.

``load_tokenizer`` loads a ``transformers`` fast tokenizer and checks that it has what MLM
pretraining needs (``<s>``, ``</s>``, ``<pad>``, ``<mask>``); ``token_ids`` reads those ids;
``train_demo_tokenizer`` trains a byte-level BPE with RoBERTa's special tokens (the demo's);
``tokenizer_hash`` identifies a tokenizer's behaviour (prepared data records it, so data made
with one tokenizer is never read with another); ``encode`` is the batch encoding without special
tokens that data preparation uses.

No JAX here: data-preparation workers import this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0, 1, 2, 3, 4


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
        bos=int(bos),
        eos=int(eos),
        pad=int(tok.pad_token_id),
        mask=int(tok.mask_token_id),
        vocab_size=len(tok),
        special=np.asarray(special, np.int32),
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
        raise ValueError(f"vocab_size={vocab_size} is below {min_vocab} (256 bytes + 5 special tokens); use e.g. 8192")
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, single_word=False, normalized=False, special=True)
    specials = [*ROBERTA_SPECIAL_TOKENS[:-1], mask]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(iter(texts), trainer=trainer)
    for i, t in enumerate(ROBERTA_SPECIAL_TOKENS):
        if bpe.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {bpe.token_to_id(t)}, expected {i}")
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", bpe.token_to_id("</s>")),
        ("<s>", bpe.token_to_id("<s>")),
        trim_offsets=True,
        add_prefix_space=False,
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token=mask,
        model_max_length=model_max_length,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def encode(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added, no truncation."""
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def tokenizer_hash(tok: Any) -> str:
    """A hash of what decides ``tok``'s token ids: its full serialisation (vocabulary, merges,
    normalisation, pre-tokenisation, added tokens) without truncation and padding settings, and
    its special tokens. Equal for a tokenizer and its saved and reloaded copy."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tok.get_vocab().items())}
    ids = token_ids(tok)
    state["special"] = [ids.bos, ids.eos, ids.pad, ids.mask, ids.vocab_size, ids.special.tolist()]
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
