"""fairseq's RoBERTa masking (train/masking.py): the count per sequence, its static bound K, the slots."""

from __future__ import annotations

import numpy as np
import pytest

from longformer_jax.losses import IGNORE_INDEX
from train import masking
from train.masking import MaskingSpec, mask_count, mask_tokens, masked_slots, max_masked

SPEC = MaskingSpec(mask_id=4, special_ids=np.array([0, 1, 2, 3, 4]), random_ids=np.arange(5, 1000))
LARGEST_U = np.nextafter(1.0, 0.0)


class ExtremeDraws:
    """A generator whose uniform draws are all one value (the extremes of fairseq's count)."""

    def __init__(self, u: float):
        self.u, self._rng = u, np.random.default_rng(0)

    def random(self, size=None):
        return np.full(size, self.u) if size is not None else self.u

    def integers(self, *args, **kw):
        return self._rng.integers(*args, **kw)


def _check_slots(ids, out):
    """The slots hold exactly the labelled positions, in increasing order, with their original ids."""
    labels, pos, slot_labels = out["labels"], out["masked_positions"], out["masked_labels"]
    assert pos.dtype == np.int32 and slot_labels.dtype == np.int32
    for r in range(len(ids)):
        labelled = np.flatnonzero(labels[r] != IGNORE_INDEX)
        used = pos[r][pos[r] >= 0]
        np.testing.assert_array_equal(used, labelled)  # none dropped, none invented, in order
        assert np.all(pos[r][len(used) :] == -1) and np.all(slot_labels[r][len(used) :] == IGNORE_INDEX)
        np.testing.assert_array_equal(slot_labels[r][: len(used)], ids[r][used])


@pytest.mark.parametrize("p", [0.15, 0.3, 0.5, 1e-3, 0.999])
def test_k_is_the_largest_count_the_draw_can_take(p):
    for L in (1, 2, 7, 20, 100, 128, 512, 4096, 16384):
        K = max_masked(L, p)
        n = np.arange(L + 1)
        assert mask_count(n, LARGEST_U, p).max() == K  # reached: by an all-maskable sequence at the top draw
        assert np.all(mask_count(n, 0.0, p) <= K) and np.all(mask_count(n, LARGEST_U, p) <= n)
        assert K in (int(np.floor(p * L)), int(np.floor(p * L)) + 1)
    assert max_masked(512, 0.15) == 77 and max_masked(4096, 0.15) == 615


@pytest.mark.parametrize("L", [1, 20, 128, 512])
def test_no_labelled_position_is_dropped_at_the_extremes(L):
    ids = np.random.default_rng(0).integers(5, 1000, (3, L)).astype(np.int32)
    ids[2] = 2  # a row with nothing maskable
    K = max_masked(L, SPEC.mlm_probability)
    top = mask_tokens({"input_ids": ids}, ExtremeDraws(LARGEST_U), SPEC)  # every count at its largest
    assert top["masked_positions"].shape == (3, K)
    _check_slots(ids, top)
    assert [int((r != IGNORE_INDEX).sum()) for r in top["labels"]] == [K, K, 0]
    low = mask_tokens({"input_ids": ids}, ExtremeDraws(0.0), SPEC)  # every count at its smallest
    _check_slots(ids, low)
    assert int((low["labels"][0] != IGNORE_INDEX).sum()) == int(np.floor(0.15 * L))


def test_fairseq_count_statistics_and_replacements():
    rng = np.random.default_rng(0)
    n, length = 64, 512
    ids = rng.integers(5, 1000, size=(n, length)).astype(np.int32)
    ids[:, ::16] = 2  # specials
    am = np.ones_like(ids)
    am[:, -100:] = 0
    ids[:, -100:] = 1
    am[5] = 0  # an empty row
    out = mask_tokens({"input_ids": ids, "attention_mask": am}, np.random.default_rng(1), SPEC)
    np.testing.assert_array_equal(ids, np.where(out["labels"] >= 0, out["labels"], ids))  # input untouched
    _check_slots(ids, out)
    chosen = out["labels"] != IGNORE_INDEX
    maskable = (am == 1) & (ids != 2)
    assert not np.any(chosen & ~maskable)  # never special tokens, never padding
    # fairseq's count: int(p * n + u), so floor(p n) or floor(p n) + 1 per row, p n on average.
    per_row, n_maskable = chosen.sum(-1), maskable.sum(-1)
    assert np.all((per_row == np.floor(0.15 * n_maskable)) | (per_row == np.floor(0.15 * n_maskable) + 1))
    assert per_row[5] == 0 and abs(per_row.sum() / n_maskable.sum() - 0.15) < 0.002
    np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])
    new = out["input_ids"][chosen]
    masked, kept = np.mean(new == 4), np.mean(new == ids[chosen])
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02
    assert np.all(new[new != 4] >= 5)  # random replacements come from the non-special vocabulary
    # The chosen positions are a uniform subset: every maskable position about equally often.
    freq = chosen[:, :400][:, maskable[0, :400]].mean(0)
    assert abs(freq.mean() - 0.15) < 0.01 and freq.std() < 0.07


def test_one_example_or_a_batch_and_determinism():
    ids = np.random.default_rng(3).integers(5, 1000, (4, 64)).astype(np.int32)
    one = mask_tokens({"input_ids": ids[0], "extra": np.arange(3)}, np.random.default_rng(7), SPEC)
    assert one["input_ids"].shape == (64,) and one["masked_positions"].shape == (max_masked(64, 0.15),)
    np.testing.assert_array_equal(one["extra"], np.arange(3))  # other fields pass through
    _check_slots(ids[:1], {k: v[None] for k, v in one.items() if k != "extra"})
    a = mask_tokens({"input_ids": ids}, np.random.default_rng(7), SPEC)
    b = mask_tokens({"input_ids": ids}, np.random.default_rng(7), SPEC)
    c = mask_tokens({"input_ids": ids}, np.random.default_rng(8), SPEC)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["labels"], c["labels"])


def test_masked_slots_of_per_token_labels():
    labels = np.full((2, 3, 10), IGNORE_INDEX)
    labels[0, 1, [2, 5, 9]] = [7, 8, 9]
    labels[1, 2, 0] = 3
    pos, lab = masked_slots(labels, 4)
    assert pos.shape == lab.shape == (2, 3, 4) and pos.dtype == np.int32
    np.testing.assert_array_equal(pos[0, 1], [2, 5, 9, -1])
    np.testing.assert_array_equal(lab[0, 1], [7, 8, 9, IGNORE_INDEX])
    np.testing.assert_array_equal(pos[1, 2], [0, -1, -1, -1])
    assert np.all(pos[0, 0] == -1) and np.all(lab[0, 0] == IGNORE_INDEX)
    wide, _ = masked_slots(labels[0], 12)  # more slots than tokens
    np.testing.assert_array_equal(wide[1], [2, 5, 9] + [-1] * 9)
    with pytest.raises(ValueError, match="a row holds 3 labels but only num_slots=2"):
        masked_slots(labels, 2)
    ids = np.random.default_rng(0).integers(5, 1000, (2, 50)).astype(np.int32)
    out = mask_tokens({"input_ids": ids}, np.random.default_rng(0), SPEC)
    pos, lab = masked_slots(out["labels"], out["masked_positions"].shape[-1])
    np.testing.assert_array_equal(pos, out["masked_positions"])
    np.testing.assert_array_equal(lab, out["masked_labels"])
    assert masking.UNUSED_SLOT == -1
