"""Masked-language-model corruption as fairseq's RoBERTa does it, in numpy: the one home of MLM masking.

Each sequence draws how many of its ``n`` maskable tokens (not a special token, not padding) are
chosen: ``num_mask = int(mlm_probability * n + u)`` with ``u ~ U[0, 1)`` (fairseq's
``MaskTokensDataset``; its mean is exactly ``mlm_probability * n``), then chooses exactly that many
positions uniformly without replacement among the maskable ones. A chosen token becomes ``<mask>``
with probability 0.8, a random token of the non-special vocabulary with probability 0.1, and stays
as it is with probability 0.1.

Because the count has a static bound ``K = max_masked(L, mlm_probability)`` for a sequence of
``L`` tokens (the largest value the draw can take), the chosen positions fit in ``K`` slots that
never drop one: ``masked_positions`` (K,) lists them in increasing order (-1 in unused slots) and
``masked_labels`` (K,) their original ids (-100 in unused slots), so the LM head runs on K rows
instead of L (``LongformerForMaskedLM.apply(..., masked_positions=...)``). ``labels`` (L,) holds
the same labels at their positions (-100 elsewhere), for code that wants them per token.

Pure functions of the example and a ``np.random.Generator``: the caller decides the seed, so
masking is fresh at every step and reproducible from the seed and the example's position.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from longformer_jax.losses import IGNORE_INDEX

UNUSED_SLOT = -1  # a masked_positions slot that holds no position
# The largest value np.random.Generator.random() returns (53-bit floats in [0, 1)).
_LARGEST_UNIFORM = np.nextafter(1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """What masking needs to know about a tokenizer.

    Attributes:
      mask_id: id of ``<mask>``.
      special_ids: ids that are never chosen (``<s>``, ``</s>``, ``<pad>``, ``<mask>``, ...).
      random_ids: ids a chosen token may be replaced with (the non-special vocabulary).
      mlm_probability: the expected share of the maskable tokens that is chosen.
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
            raise ValueError(f"mlm_probability={self.mlm_probability} must lie in (0, 1); RoBERTa uses 0.15")
        fractions = (self.mask_fraction, self.random_fraction)
        if min(fractions) < 0 or sum(fractions) > 1:
            raise ValueError(
                f"mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} must be "
                "non-negative with a sum of at most 1; RoBERTa uses 0.8 and 0.1"
            )
        if len(self.random_ids) == 0:
            raise ValueError("random_ids is empty: the vocabulary has no non-special token to sample")


def mask_count(num_maskable, u, mlm_probability: float) -> np.ndarray:
    """fairseq's count of chosen tokens: ``int(mlm_probability * n + u)``, at most ``n`` (int64)."""
    n = np.asarray(num_maskable, np.int64)
    count = np.floor(np.float64(mlm_probability) * n + np.asarray(u, np.float64)).astype(np.int64)
    return np.minimum(count, n)


def max_masked(seq_len: int, mlm_probability: float) -> int:
    """K: the most tokens `mask_tokens` can choose in a sequence of ``seq_len`` tokens.

    The count grows with the number of maskable tokens and with ``u``, so its largest value is
    the count of a sequence whose every token is maskable, at the largest uniform draw (computed
    with the same floating-point operations, so no draw can exceed it)."""
    return int(mask_count(seq_len, _LARGEST_UNIFORM, mlm_probability))


def _choose(maskable_NxL: np.ndarray, rng: np.random.Generator, mlm_probability: float):
    """(positions (N, K) increasing with -1 after them, chosen (N, L) bool) of fairseq's draw."""
    N, L = maskable_NxL.shape
    K = max_masked(L, mlm_probability)
    count_N = mask_count(maskable_NxL.sum(-1), rng.random(N), mlm_probability)
    # A uniform random subset of `count` maskable positions: the maskable ones in a random order
    # (random keys; non-maskable ones sort last), cut at `count`.
    keys_NxL = np.where(maskable_NxL, rng.random((N, L)), 2.0)
    first_NxK = np.argsort(keys_NxL, axis=-1, kind="stable")[:, :K]
    used_NxK = np.arange(K)[None, :] < count_N[:, None]
    positions_NxK = np.sort(np.where(used_NxK, first_NxK, L), axis=-1)
    chosen_NxL = np.zeros((N, L + 1), bool)
    np.put_along_axis(chosen_NxL, positions_NxK, True, axis=-1)
    return np.where(positions_NxK < L, positions_NxK, UNUSED_SLOT), chosen_NxL[:, :L]


def mask_tokens(
    example: dict[str, np.ndarray],
    rng: np.random.Generator,
    spec: MaskingSpec,
) -> dict[str, np.ndarray]:
    """Returns ``example`` with ``input_ids`` corrupted and the labels added.

    Works on one example (arrays of shape (L,)) or a batch (B, L). Other fields are passed
    through unchanged; the input arrays are not modified. Added, all int32:

    - ``labels`` (..., L): the original id at chosen positions, -100 elsewhere;
    - ``masked_positions`` (..., K): the chosen positions in increasing order, -1 in unused
      slots, with ``K = max_masked(L, spec.mlm_probability)``;
    - ``masked_labels`` (..., K): the original id at each chosen position, -100 in unused slots.

    Args:
      example: ``input_ids`` and ``attention_mask`` (0 marks padding), plus any other fields.
      rng: the generator that decides which tokens are chosen and how they are replaced.
      spec: token ids and probabilities.
    """
    ids = np.asarray(example["input_ids"])
    maskable = ~np.isin(ids, spec.special_ids)
    if "attention_mask" in example:
        maskable &= np.asarray(example["attention_mask"]) != 0
    L = ids.shape[-1]
    positions, chosen = _choose(maskable.reshape(-1, L), rng, spec.mlm_probability)
    K = positions.shape[-1]
    positions, chosen = positions.reshape(ids.shape[:-1] + (K,)), chosen.reshape(ids.shape)
    u_how = rng.random(ids.shape)
    random_tokens = spec.random_ids[rng.integers(0, len(spec.random_ids), size=ids.shape)]
    to_mask = chosen & (u_how < spec.mask_fraction)
    to_random = chosen & (u_how >= spec.mask_fraction) & (u_how < spec.mask_fraction + spec.random_fraction)
    new_ids = np.where(to_mask, spec.mask_id, ids)
    new_ids = np.where(to_random, random_tokens, new_ids)
    used = positions != UNUSED_SLOT
    out = dict(example)
    out["input_ids"] = new_ids.astype(np.int32)
    out["labels"] = np.where(chosen, ids, IGNORE_INDEX).astype(np.int32)
    out["masked_positions"] = positions.astype(np.int32)
    out["masked_labels"] = np.where(used, np.take_along_axis(ids, np.maximum(positions, 0), -1), IGNORE_INDEX).astype(
        np.int32
    )
    return out


def masked_slots(labels, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """``(masked_positions, masked_labels)`` (..., num_slots) int32 of per-token ``labels`` (..., L).

    The positions whose label is not -100, in increasing order, then -1; their labels, then -100.
    For batches masked elsewhere (a ``ValueError`` when a row holds more labels than slots)."""
    labels = np.asarray(labels)
    L = labels.shape[-1]
    flat = labels.reshape(-1, L)
    labelled = flat != IGNORE_INDEX
    most = int(labelled.sum(-1).max(initial=0))
    if most > num_slots:
        raise ValueError(
            f"a row holds {most} labels but only num_slots={num_slots} slots were asked for; "
            f"use at least {most} (train.masking.max_masked gives the bound of mask_tokens)"
        )
    order = np.argsort(~labelled, axis=-1, kind="stable")[:, :num_slots]  # labelled positions first, in order
    used = np.take_along_axis(labelled, order, -1)
    positions = np.full((len(flat), num_slots), UNUSED_SLOT, np.int32)
    slot_labels = np.full((len(flat), num_slots), IGNORE_INDEX, np.int32)
    positions[:, : order.shape[1]] = np.where(used, order, UNUSED_SLOT)
    slot_labels[:, : order.shape[1]] = np.where(used, np.take_along_axis(flat, order, -1), IGNORE_INDEX)
    shape = labels.shape[:-1] + (num_slots,)
    return positions.reshape(shape), slot_labels.reshape(shape)
