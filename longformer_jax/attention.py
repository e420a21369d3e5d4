"""Longformer attention as pure JAX functions (no Flax here).

Shapes use suffixes: B batch, L (padded) sequence, H heads, D head dim, G global slots, N query
blocks, C query block size, K keys of one block (C + 2w), W = 2w + 1 band columns.

The exact behaviour (``../shared/SPEC.md``): a local (non-global, non-pad) query ``i`` attends, with
the local q/k/v, to the keys ``{j : |i-j| <= w, j local}`` plus every global key, the latter as
extra columns (global keys are removed from the band so none counts twice). A global query attends
with the global q/k/v to every non-pad key. Pad query rows get a zero output. Softmax in float32.

The band is computed in query blocks of ``C`` rows (``C`` divides ``w``): block ``n`` sees the keys
``n*C - w .. n*C + C - 1 + w``, so one block's scores are ``C x (C + 2w)`` and the work and memory
grow linearly with ``L`` -- there is never an ``L x L`` array. Global attention uses a static number
``G`` of global slots per row (``global_slots``), so every shape is fixed by ``(B, L, G)``.

``dense_attention`` is the O(L^2) statement of the same thing, used by the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# HF fills masked scores with finfo(float32).min (not -inf): a row whose every key is masked then
# gets a uniform distribution instead of NaN. We reproduce that for exact attention outputs.
_MASKED = float(jnp.finfo(jnp.float32).min)
_OUTSIDE = -jnp.inf  # positions outside the band or the sequence: exactly zero probability


class GlobalSlots(NamedTuple):
    """The global tokens of each row, in order, padded to a static number of slots ``G``."""

    index_BxG: Array  # position of the g-th global token of the row (0 where the slot is empty)
    valid_BxG: Array  # bool: slot g holds a global token
    overflow_B: Array  # bool: the row has more global tokens than slots (its output is invalid)


def global_slots(is_global_BxL: Array, num_slots: int) -> GlobalSlots:
    """Positions of the global tokens of every row in ``num_slots`` static slots (in order)."""
    B, L = is_global_BxL.shape
    count_B = jnp.sum(is_global_BxL, axis=-1, dtype=jnp.int32)
    if num_slots == 0:
        empty = jnp.zeros((B, 0), jnp.int32)
        return GlobalSlots(empty, empty.astype(bool), count_B > 0)
    # Rank of each global token within its row; tokens beyond the slots are dropped.
    rank_BxL = jnp.cumsum(is_global_BxL, axis=-1, dtype=jnp.int32) - 1
    slot_BxL = jnp.where(is_global_BxL & (rank_BxL < num_slots), rank_BxL, num_slots)
    pos_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    index_BxG = jnp.zeros((B, num_slots + 1), jnp.int32)
    index_BxG = index_BxG.at[jnp.arange(B)[:, None], slot_BxL].set(pos_BxL, mode="drop")[:, :num_slots]
    valid_BxG = jnp.arange(num_slots)[None, :] < count_B[:, None]
    index_BxG = jnp.where(valid_BxG, index_BxG, 0)
    return GlobalSlots(index_BxG, valid_BxG, count_B > num_slots)


def _gather_rows(x_BxLx___: Array, index_BxG: Array) -> Array:
    return jnp.take_along_axis(x_BxLx___, index_BxG.reshape(index_BxG.shape + (1,) * (x_BxLx___.ndim - 2)), axis=1)


def _dropout(rng: Array | None, rate: float, p: Array) -> Array:
    if rng is None or rate == 0.0:
        return p
    keep = jax.random.bernoulli(rng, 1.0 - rate, p.shape)
    return jnp.where(keep, p / (1.0 - rate), 0.0).astype(p.dtype)


def _blocks(x_BxLxHxD: Array, block: int) -> Array:
    B, L, H, D = x_BxLxHxD.shape
    return x_BxLxHxD.reshape(B, L // block, block, H, D)


def _key_windows(x_BxLx___: Array, w: int, block: int, fill) -> Array:
    """For every query block, the ``block + 2w`` keys it may see: (B, N, C + 2w, ...)."""
    B, L = x_BxLx___.shape[:2]
    rest = x_BxLx___.shape[2:]
    pad = [(0, 0), (w, w)] + [(0, 0)] * len(rest)
    xp = jnp.pad(x_BxLx___, pad, constant_values=fill)
    n_blocks = L // block
    span = 2 * w // block + 1  # key blocks per query block
    xp = xp.reshape((B, n_blocks + span - 1, block) + rest)
    parts = [xp[:, j : j + n_blocks] for j in range(span)]
    return jnp.concatenate(parts, axis=2)


def band_to_hf_layout(p_BxHxNxCxK: Array, w: int) -> Array:
    """Blocked band probabilities -> HF layout (B, H, L, 2w+1), column ``w`` the query itself."""
    B, H, N, C, K = p_BxHxNxCxK.shape
    cols = jnp.arange(C)[:, None] + jnp.arange(2 * w + 1)[None, :]  # (C, W): key r + c of row r
    p = jnp.take_along_axis(p_BxHxNxCxK, jnp.broadcast_to(cols, (B, H, N, C, 2 * w + 1)), axis=-1)
    return p.reshape(B, H, N * C, 2 * w + 1)


def sliding_window_attention(
    q_BxLxHxD: Array,
    k_BxLxHxD: Array,
    v_BxLxHxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    slots: GlobalSlots | None = None,
    *,
    block_size: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
) -> tuple[Array, Array | None]:
    """Local attention of every query: the band of ``w`` keys each side plus the global keys.

    ``q`` is already scaled by ``1/sqrt(D)``. ``mask_BxL``: 0 pad, 1 local, 2 global (HF's merged
    mask). Pad and global keys are removed from the band; the global keys (``slots``) are added
    as ``G`` extra columns with the local key/value projections. Returns the output (B, L, H, D)
    (zero on pad rows) and, if asked, the probabilities in HF's layout (B, H, L, G + 2w + 1).
    Rows of global queries are returned as computed here; the caller replaces them.
    """
    B, L, H, D = q_BxLxHxD.shape
    w = one_sided_window
    C = block_size or w
    if w <= 0 or w % C or L % C or L % (2 * w):
        raise ValueError(
            f"sliding_window_attention: sequence length {L} must be a multiple of the window 2w={2 * w}, "
            f"and the block size {C} must divide w={w}."
        )
    N, K = L // C, C + 2 * w
    dtype = v_BxLxHxD.dtype

    q_BxNxCxHxD = _blocks(q_BxLxHxD, C)
    k_BxNxKxHxD = _key_windows(k_BxLxHxD, w, C, 0)
    v_BxNxKxHxD = _key_windows(v_BxLxHxD, w, C, 0)
    # 0 outside the sequence, 1 pad/global (masked like HF), 2 a local key.
    key_state_BxL = jnp.where(mask_BxL == 1, 2, 1).astype(jnp.int8)
    key_state_BxNxK = _key_windows(key_state_BxL, w, C, 0)

    s_BxHxNxCxK = jnp.einsum(
        "bnqhd,bnkhd->bhnqk", q_BxNxCxHxD, k_BxNxKxHxD, preferred_element_type=jnp.float32
    )
    r = jnp.arange(C)[:, None]
    kk = jnp.arange(K)[None, :]
    in_band_CxK = (kk >= r) & (kk <= r + 2 * w)
    state = key_state_BxNxK[:, None, :, None, :]
    s_BxHxNxCxK = jnp.where(
        in_band_CxK & (state > 0), jnp.where(state == 2, s_BxHxNxCxK, _MASKED), _OUTSIDE
    )

    G = 0 if slots is None else slots.index_BxG.shape[1]
    if G:
        kg_BxGxHxD = _gather_rows(k_BxLxHxD, slots.index_BxG)
        vg_BxGxHxD = _gather_rows(v_BxLxHxD, slots.index_BxG)
        sg_BxHxNxCxG = jnp.einsum(
            "bnqhd,bghd->bhnqg", q_BxNxCxHxD, kg_BxGxHxD, preferred_element_type=jnp.float32
        )
        sg_BxHxNxCxG = jnp.where(slots.valid_BxG[:, None, None, None, :], sg_BxHxNxCxG, _MASKED)
        s_BxHxNxCxK = jnp.concatenate([sg_BxHxNxCxG, s_BxHxNxCxK], axis=-1)

    p = jax.nn.softmax(s_BxHxNxCxK, axis=-1)
    q_pad_BxN_C = (mask_BxL == 0).reshape(B, 1, N, C, 1)
    p = jnp.where(q_pad_BxN_C, 0.0, p)
    p = _dropout(dropout_rng, dropout_rate, p)

    pg, pb = p[..., :G], p[..., G:]
    out_BxNxCxHxD = jnp.einsum(
        "bhnqk,bnkhd->bnqhd", pb.astype(dtype), v_BxNxKxHxD, preferred_element_type=jnp.float32
    )
    if G:
        out_BxNxCxHxD += jnp.einsum(
            "bhnqg,bghd->bnqhd", pg.astype(dtype), vg_BxGxHxD, preferred_element_type=jnp.float32
        )
    out_BxLxHxD = out_BxNxCxHxD.reshape(B, L, H, D).astype(dtype)

    probs = None
    if return_probs:
        band = band_to_hf_layout(pb, w)
        probs = jnp.concatenate([pg.reshape(B, H, L, G), band], axis=-1) if G else band
    return out_BxLxHxD, probs


def global_query_attention(
    qg_BxGxHxD: Array,
    k_BxLxHxD: Array,
    v_BxLxHxD: Array,
    mask_BxL: Array,
    slots: GlobalSlots,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, Array]:
    """Global queries (``G`` slots, global projections, scaled) over every non-pad key.

    Returns the output (B, G, H, D) and the probabilities (B, H, G, L). Empty slots and pad keys
    are filled with float32's min as HF does (an empty slot's row is uniform, and unused).
    """
    dtype = v_BxLxHxD.dtype
    s_BxHxGxL = jnp.einsum("bghd,blhd->bhgl", qg_BxGxHxD, k_BxLxHxD, preferred_element_type=jnp.float32)
    keep = slots.valid_BxG[:, None, :, None] & (mask_BxL != 0)[:, None, None, :]
    s_BxHxGxL = jnp.where(keep, s_BxHxGxL, _MASKED)
    p_BxHxGxL = jax.nn.softmax(s_BxHxGxL, axis=-1)
    p_drop = _dropout(dropout_rng, dropout_rate, p_BxHxGxL)
    out_BxGxHxD = jnp.einsum(
        "bhgl,blhd->bghd", p_drop.astype(dtype), v_BxLxHxD, preferred_element_type=jnp.float32
    ).astype(dtype)
    return out_BxGxHxD, p_BxHxGxL


def scatter_global_rows(out_BxLxHxD: Array, rows_BxGxHxD: Array, slots: GlobalSlots) -> Array:
    """Write the global queries' outputs over their rows (empty slots write nothing)."""
    B, L = out_BxLxHxD.shape[:2]
    index = jnp.where(slots.valid_BxG, slots.index_BxG, L)  # L: out of bounds -> dropped
    return out_BxLxHxD.at[jnp.arange(B)[:, None], index].set(rows_BxGxHxD, mode="drop")


def dense_attention(
    q_BxLxHxD: Array,
    k_BxLxHxD: Array,
    v_BxLxHxD: Array,
    qg_BxLxHxD: Array,
    kg_BxLxHxD: Array,
    vg_BxLxHxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
) -> tuple[Array, Array]:
    """The O(L^2) reference: the SPEC's dense statement, for tests only.

    Takes the local and global projections of every position (queries scaled). Returns the output
    (B, L, H, D) and the (B, H, L, L) probabilities of every row (global rows: the global ones).
    """
    L = q_BxLxHxD.shape[1]
    w = one_sided_window
    i = jnp.arange(L)[:, None]
    j = jnp.arange(L)[None, :]
    is_pad = mask_BxL == 0
    is_global = mask_BxL == 2
    local_keys = (jnp.abs(i - j) <= w)[None] & (mask_BxL == 1)[:, None, :]
    local_keys = local_keys | is_global[:, None, :]  # (B, L, L)
    s_local = jnp.einsum("bihd,bjhd->bhij", q_BxLxHxD, k_BxLxHxD)
    s_local = jnp.where(local_keys[:, None], s_local, -jnp.inf)
    s_global = jnp.einsum("bihd,bjhd->bhij", qg_BxLxHxD, kg_BxLxHxD)
    s_global = jnp.where(~is_pad[:, None, None, :], s_global, -jnp.inf)
    p_local = jax.nn.softmax(jnp.where(is_pad[:, None, :, None], 0.0, s_local), axis=-1)
    p_global = jax.nn.softmax(s_global, axis=-1)
    out_local = jnp.einsum("bhij,bjhd->bihd", p_local, v_BxLxHxD)
    out_global = jnp.einsum("bhij,bjhd->bihd", p_global, vg_BxLxHxD)
    out = jnp.where(is_global[:, :, None, None], out_global, out_local)
    out = jnp.where(is_pad[:, :, None, None], 0.0, out)
    p = jnp.where(is_global[:, None, :, None], p_global, p_local)
    p = jnp.where(is_pad[:, None, :, None], 0.0, p)
    return out, p
