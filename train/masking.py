"""Masked-language-model corruption as RoBERTa does it, in numpy.

Each maskable token (not a special token, not padding) is chosen with probability
``mlm_probability``; a chosen token becomes ``<mask>`` with probability 0.8, a random token of
the non-special vocabulary with probability 0.1, and stays as it is with probability 0.1. The
labels hold the original id at chosen positions and -100 elsewhere (the loss ignores -100).
This is the Bernoulli form used by Hugging Face's ``DataCollatorForLanguageModeling``.

Pure functions of the example and a ``np.random.Generator``: the caller decides the seed, so
masking is fresh at every step and reproducible from the seed and the example's position.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from longformer_jax.losses import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """What masking needs to know about a tokenizer.

    Attributes:
      mask_id: id of ``<mask>``.
      special_ids: ids that are never chosen (``<s>``, ``</s>``, ``<pad>``, ``<mask>``, ...).
      random_ids: ids a chosen token may be replaced with (the non-special vocabulary).
      mlm_probability: chance that a maskable token is chosen.
      mask_fraction: of the chosen tokens, the share replaced by ``<mask>``.
      random_fraction: of the chosen tokens, the share replaced by a random token.
    """

    mask_id: int
    special_ids: np.ndarray
    random_ids: np.ndarray
    mlm_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(
                f"mlm_probability={self.mlm_probability} must lie in (0, 1); RoBERTa uses 0.15"
            )
        fractions = (self.mask_fraction, self.random_fraction)
        if min(fractions) < 0 or sum(fractions) > 1:
            raise ValueError(
                f"mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} must be "
                "non-negative with a sum of at most 1; RoBERTa uses 0.8 and 0.1"
            )
        if len(self.random_ids) == 0:
            raise ValueError("random_ids is empty: the vocabulary has no non-special token to sample")


def mask_tokens(
    example: dict[str, np.ndarray],
    rng: np.random.Generator,
    spec: MaskingSpec,
) -> dict[str, np.ndarray]:
    """Returns ``example`` with ``input_ids`` corrupted and ``labels`` added.

    Works on one example (arrays of shape (L,)) or a batch (B, L). Other fields are passed
    through unchanged; the input arrays are not modified.

    Args:
      example: ``input_ids`` and ``attention_mask`` (0 marks padding), plus any other fields.
      rng: the generator that decides which tokens are chosen and how they are replaced.
      spec: token ids and probabilities.
    """
    ids = np.asarray(example["input_ids"])
    maskable = ~np.isin(ids, spec.special_ids)
    if "attention_mask" in example:
        maskable &= np.asarray(example["attention_mask"]) != 0
    u_choose = rng.random(ids.shape)
    u_how = rng.random(ids.shape)
    random_tokens = spec.random_ids[rng.integers(0, len(spec.random_ids), size=ids.shape)]
    chosen = maskable & (u_choose < spec.mlm_probability)
    to_mask = chosen & (u_how < spec.mask_fraction)
    to_random = chosen & (u_how >= spec.mask_fraction) & (u_how < spec.mask_fraction + spec.random_fraction)
    new_ids = np.where(to_mask, spec.mask_id, ids)
    new_ids = np.where(to_random, random_tokens, new_ids)
    out = dict(example)
    out["input_ids"] = new_ids.astype(np.int32)
    out["labels"] = np.where(chosen, ids, IGNORE_INDEX).astype(np.int32)
    return out
