"""Inference helpers: fill-mask.

``fill_mask(model_or_dir, text, top_k=5)`` answers like ``transformers.pipeline("fill-mask")``: for
each ``<mask>`` a list of ``{"score", "token", "token_str", "sequence"}``, best first. Texts may be as
long as the model allows (``config.max_sequence_length``). Inputs are padded into buckets (a power of
two times the attention window, capped at the model's limit) so each bucket compiles once; the LM
head runs only on the masked positions (``LongformerForMaskedLM``'s ``masked_positions``), so a
4096-token text never materialises (L, vocab) logits.
Global attention: on ``<s>`` by default, or on the positions given.

Classification with a model fine-tuned by ``python -m train.finetune`` lays each text out exactly as
the model was fine-tuned, with the training program's layout code: ``train.finetune_eval.classify``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax.heads import LongformerForMaskedLM
from longformer_jax.inputs import pow2_bucket
from longformer_jax.pretrained import load_pretrained, resolve_source


def _bucket_length(n: int, window: int, limit: int) -> int:
    """Smallest window * 2^k >= n, capped at `limit` (the model pads that one to the window itself)."""
    return min(window * pow2_bucket(-(-n // window)), limit)


class FillMaskPipeline:
    """A masked-LM Flax model, its params and tokenizer, with one compiled function per bucket."""

    def __init__(self, model, params, tokenizer):
        if not isinstance(model, LongformerForMaskedLM):
            raise ValueError(
                f"fill-mask needs a LongformerForMaskedLM, got {type(model).__name__}; load the model with "
                "task='masked-lm'."
            )
        if tokenizer is None:
            raise ValueError(
                "fill-mask needs a tokenizer: pass tokenizer= (a transformers tokenizer or a "
                "directory holding tokenizer files)."
            )
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer), trust_remote_code=False)
        if tokenizer.mask_token_id is None:
            raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no mask token.")
        self.model = model
        self.config = model.config
        self.params = params
        self.tokenizer = tokenizer
        self._fn = jax.jit(self._top_k, static_argnames=("num_global_slots", "top_k"))

    # -------------------------------------------------------------------------- compiled part
    def _top_k(self, params, ids_BxL, attention_BxL, global_BxL, positions_BxM, *, num_global_slots, top_k):
        out = self.model.apply(
            {"params": params},
            ids_BxL,
            attention_mask=attention_BxL,
            global_attention_mask=global_BxL,
            deterministic=True,
            num_global_slots=num_global_slots,
            masked_positions=positions_BxM,
        )
        probs_BxMxV = jax.nn.softmax(out.logits.astype(jnp.float32), axis=-1)
        return jax.lax.top_k(probs_BxMxV, top_k)

    # -------------------------------------------------------------------------- host part
    def _global_positions(self, ids: list[int], spec) -> list[int]:
        if spec is None:  # default: every <s> (the cls/bos token)
            cls_id = self.tokenizer.cls_token_id
            if cls_id is None:
                cls_id = self.config.bos_token_id
            return [i for i, t in enumerate(ids) if t == cls_id]
        out = []
        for p in spec:
            p = int(p)
            q = p + len(ids) if p < 0 else p
            if not 0 <= q < len(ids):
                raise ValueError(
                    f"global attention position {p} is outside the input of {len(ids)} tokens "
                    "(positions count the tokens of the encoded text, <s> included)."
                )
            out.append(q)
        return sorted(set(out))

    def __call__(self, text_or_texts: str | Sequence[str], top_k: int = 5, global_attention=None):
        single = isinstance(text_or_texts, str)
        texts = [text_or_texts] if single else list(text_or_texts)
        if not texts:
            return []
        if top_k < 1 or top_k > self.config.vocab_size:
            raise ValueError(f"top_k={top_k} must be in 1..{self.config.vocab_size} (the vocabulary size).")
        per_text_global = self._per_text_global(global_attention, len(texts))
        tok = self.tokenizer
        limit = self.config.max_sequence_length
        encoded = []
        for i, text in enumerate(texts):
            ids = list(tok(text)["input_ids"])
            if len(ids) > limit:
                raise ValueError(
                    f"text {i} is {len(ids)} tokens long; this model takes at most {limit} "
                    f"(max_position_embeddings {self.config.max_position_embeddings}). Shorten the text."
                )
            masks = [j for j, t in enumerate(ids) if t == tok.mask_token_id]
            if not masks:
                raise ValueError(f"no mask token ({tok.mask_token}) in text {i}: {text[:80]!r}")
            encoded.append((ids, masks, self._global_positions(ids, per_text_global[i])))

        window = self.config.max_window
        L = _bucket_length(max(len(e[0]) for e in encoded), window, limit)
        B = pow2_bucket(len(encoded))
        M = pow2_bucket(max(len(e[1]) for e in encoded))
        G = pow2_bucket(max(len(e[2]) for e in encoded))
        pad = self.config.pad_token_id
        ids_BxL = np.full((B, L), pad, np.int32)
        attn_BxL = np.zeros((B, L), np.int32)
        glob_BxL = np.zeros((B, L), np.int32)
        pos_BxM = np.full((B, M), -1, np.int32)  # -1: an unused slot
        for b, (ids, masks, globs) in enumerate(encoded):
            ids_BxL[b, : len(ids)] = ids
            attn_BxL[b, : len(ids)] = 1
            glob_BxL[b, globs] = 1
            pos_BxM[b, : len(masks)] = masks
        values, indices = self._fn(
            self.params, ids_BxL, attn_BxL, glob_BxL, pos_BxM, num_global_slots=G, top_k=int(top_k)
        )
        values, indices = np.asarray(values), np.asarray(indices)

        results = []
        for b, (ids, masks, _) in enumerate(encoded):
            single_mask = len(masks) == 1
            per_mask = []
            for m, position in enumerate(masks):
                row = []
                for score, token in zip(values[b, m].tolist(), indices[b, m].tolist(), strict=True):
                    filled = np.asarray(ids).copy()
                    filled[position] = token
                    filled = filled[filled != tok.pad_token_id]
                    row.append(
                        {
                            "score": float(score),
                            "token": int(token),
                            "token_str": tok.decode([int(token)]),
                            "sequence": tok.decode(filled.tolist(), skip_special_tokens=single_mask),
                        }
                    )
                per_mask.append(row)
            results.append(per_mask[0] if single_mask else per_mask)
        return results[0] if single else results

    @staticmethod
    def _per_text_global(spec, n: int) -> list[Any]:
        """None -> default for all; a flat list of ints -> the same positions for every text;
        a list of lists -> one list per text."""
        if spec is None:
            return [None] * n
        spec = list(spec)
        if spec and all(isinstance(s, (list, tuple, np.ndarray)) or s is None for s in spec):
            if len(spec) != n:
                raise ValueError(f"global_attention has {len(spec)} lists for {n} texts; give one per text.")
            return spec
        return [spec] * n


# The files one of which a tokenizer directory holds (fast tokenizer, byte-level BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


@functools.lru_cache(maxsize=4)
def _model_for_directory(directory: str, dtype: str):
    local = str(resolve_source(directory))
    model, params = load_pretrained(local, task="masked-lm", dtype=dtype)
    return local, model, params


@functools.lru_cache(maxsize=4)
def _pipeline_for_directory(directory: str, dtype: str) -> FillMaskPipeline:
    """The model of ``directory`` with the tokenizer beside it; a ValueError when there is none."""
    local, model, params = _model_for_directory(directory, dtype)
    if not any(os.path.exists(os.path.join(local, name)) for name in TOKENIZER_FILES):
        raise ValueError(
            f"fill-mask: {directory} holds a model but no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). "
            "Pass tokenizer= (a transformers tokenizer, a directory or a hub id), or save the tokenizer beside the "
            "model (lj.save_pretrained(dir, model, params, tokenizer=...) or tokenizer.save_pretrained(dir))."
        )
    return FillMaskPipeline(model, params, local)


def fill_mask(
    model_or_dir,
    text_or_texts: str | Sequence[str],
    top_k: int = 5,
    tokenizer=None,
    global_attention=None,
    *,
    params=None,
    dtype: str = "float32",
):
    """Top-k fillers of every ``<mask>`` in `text_or_texts`, as HF's fill-mask pipeline.

    `model_or_dir`: a model directory (HF or Flax checkpoint) or hub id, a `FillMaskPipeline`, or a
    `LongformerForMaskedLM` module together with ``params=``. `tokenizer`: a transformers tokenizer or
    a directory (default: the model directory's). `global_attention`: None (``<s>``), a list of
    token positions (for every text; ``[]`` = none), or one list per text.

    Returns, for one text with one mask, a list of ``{"score", "token", "token_str", "sequence"}``;
    with several masks, one such list per mask; for a list of texts, one result per text.
    """
    if isinstance(model_or_dir, FillMaskPipeline):
        pipe = model_or_dir
    elif isinstance(model_or_dir, (str, os.PathLike)) and tokenizer is None:
        pipe = _pipeline_for_directory(os.fspath(model_or_dir), dtype)
    elif isinstance(model_or_dir, (str, os.PathLike)):
        _, model, params = _model_for_directory(os.fspath(model_or_dir), dtype)
        pipe = FillMaskPipeline(model, params, tokenizer)
    else:
        if params is None:
            raise ValueError("fill_mask(model, ...) with a Flax module needs params=.")
        pipe = FillMaskPipeline(model_or_dir, params, tokenizer)
    return pipe(text_or_texts, top_k=top_k, global_attention=global_attention)
