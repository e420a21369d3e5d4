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

Two implementations of the band, with the same numbers, both head-major (B, H, L, D):
``sliding_window_attention_heads`` materialises the (B, H, N, C, K) probabilities (needed for
``output_attentions``); ``lean_band_attention_heads`` (what the model runs otherwise) walks over
chunks of query blocks with a custom VJP that recomputes the scores in the backward pass, so
training keeps O(L * D) per layer instead of O(L * (C + 2w)). Both take their key windows from
``_padded_blocks`` and ``_key_windows`` and their masks from ``_window_bias``: one additive bias
shared by the heads; the softmax is normalised after the value product. The lean band also takes
its global columns given (``lean_band_with_global_keys_heads``: keys of global tokens that other
devices hold, ``longformer_jax.sequence_parallel``). Global queries:
``global_query_attention_heads`` (or ``..._from_hidden_heads``, projections folded into the
queries), their rows written over the band's by ``scatter_global_rows_heads``.

Two patterns that transformers lacks (allenai's original Longformer had them, in a CUDA kernel):

- dilated windows (``dilation=d``, an int or one per head): query ``i`` sees the local keys ``i + d*k``
  for ``k`` in ``-w .. w``. Exact and as cheap as the ordinary band: the positions with the same
  residue mod ``d`` form a subsequence, on which the dilated band is an ordinary band, so the sequence
  is reshaped into ``B * d`` rows of ``L / d`` tokens (``band_pattern``, or ``band_pattern_on`` with the
  global columns given; no gather, no L x L array).
- causal windows (``causal=True``): every attention restricted to keys ``j <= i``: the band is
  ``i - w .. i`` (``d * k`` for ``k`` in ``-w .. 0`` when dilated; a block sees ``C + w`` keys, not
  ``C + 2w``), a local query sees the global keys ``j <= i``, and a global query the non-pad keys
  ``j <= i``.

The two-sided undilated band takes the same code path (and compiles to the same program) as before
they existed. ``dense_attention`` is the O(L^2) statement of every pattern (``dense_attention_mask``:
which keys each query may attend), used by the tests and by ``longformer_jax.patterns``' check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax.dropout import apply_mask, dropout, keep_mask

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
    row_Bx1 = jax.lax.broadcasted_iota(jnp.int32, (B, 1), 0)  # not arange(B): B may be symbolic (jax.export)
    index_BxG = index_BxG.at[row_Bx1, slot_BxL].set(pos_BxL, mode="drop")[:, :num_slots]
    valid_BxG = jnp.arange(num_slots)[None, :] < count_B[:, None]
    index_BxG = jnp.where(valid_BxG, index_BxG, 0)
    return GlobalSlots(index_BxG, valid_BxG, count_B > num_slots)


# ------------------------------------------------------------------------------ band windows and bias
# Query block n (queries n*C .. n*C + C - 1) sees the keys n*C - w .. n*C + C - 1 + w: with the
# sequence padded by w zeros each side and cut into blocks of C, that is the span = 2w / C + 1
# consecutive key blocks n .. n + span - 1.


def _padded_blocks(x: Array, w: int, C: int, axis: int, right: int | None = None) -> Array:
    """``x`` with ``w`` zeros each side of its sequence axis, cut into blocks: (..., L / C + 2w / C, C, ...).

    ``right``: the zeros after the sequence when the band is not two-sided (0: the causal band)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (w, w if right is None else right)
    xp = jnp.pad(x, pad)
    return xp.reshape(xp.shape[:axis] + (xp.shape[axis] // C, C) + xp.shape[axis + 1 :])


def _key_windows(blocks: Array, n: int, span: int, axis: int) -> Array:
    """The keys of ``n`` query blocks from their ``n + span - 1`` padded key blocks on ``axis``.

    (..., n + span - 1, C, ...) -> (..., n, span * C, ...): window ``i`` is blocks ``i .. i + span - 1``."""
    parts = [jax.lax.slice_in_dim(blocks, j, j + n, axis=axis) for j in range(span)]
    return jnp.concatenate(parts, axis=axis + 1)


def _key_state(mask_BxL: Array) -> Array:
    """Per key: 2 a local key, 1 pad or global (masked like HF); the padding outside the sequence is 0."""
    return jnp.where(mask_BxL == 1, 2, 1).astype(jnp.int8)


def _window_bias(state_Bx___xK: Array, w: int, C: int, right: int | None = None) -> Array:
    """Additive score bias (..., C, C + 2w) float32 of query blocks whose key windows have ``state``.

    0 for a local key inside the band; float32's min for a pad or global key inside the band (HF
    adds it: ``score + min == min`` in float32, so adding equals HF's fill); ``-inf`` outside the
    band or the sequence (exactly zero probability). ``right``: the keys after the query when the band
    is not two-sided (0: the causal band, (..., C, C + w))."""
    span = 2 * w if right is None else w + right
    K = C + span
    r = jnp.arange(C)[:, None]
    kk = jnp.arange(K)[None, :]
    in_band_CxK = (kk >= r) & (kk <= r + span)
    state = state_Bx___xK[..., None, :]
    return jnp.where(in_band_CxK & (state > 0), jnp.where(state == 2, 0.0, _MASKED), _OUTSIDE).astype(jnp.float32)


def band_to_hf_layout(p_BxHxNxCxK: Array, w: int, right: int | None = None) -> Array:
    """Blocked band probabilities -> HF layout (B, H, L, 2w+1), column ``w`` the query itself.

    ``right``: the keys after the query (0 for the causal band, whose ``w + 1`` columns are returned)."""
    B, H, N, C, K = p_BxHxNxCxK.shape
    W = 2 * w + 1 if right is None else w + right + 1
    cols = jnp.arange(C)[:, None] + jnp.arange(W)[None, :]  # (C, W): key r + c of row r
    p = jnp.take_along_axis(p_BxHxNxCxK, jnp.broadcast_to(cols, (B, H, N, C, W)), axis=-1)
    return p.reshape(B, H, N * C, W)


def band_bias(mask_BxL: Array, one_sided_window: int, block_size: int, right: int | None = None) -> Array:
    """Additive score bias of the blocked band, (B, 1, N, C, C + 2w) float32 (see ``_window_bias``)."""
    w, C = one_sided_window, block_size
    N = mask_BxL.shape[1] // C
    span = 2 * w // C + 1 if right is None else (w + right) // C + 1
    state_Bx1xL = _key_state(mask_BxL)[:, None]  # a size-1 head axis: the bias is shared by the heads
    state_Bx1xNxK = _key_windows(_padded_blocks(state_Bx1xL, w, C, axis=2, right=right), N, span, axis=2)
    return _window_bias(state_Bx1xNxK, w, C, right)


def _band_block_size(L: int, w: int, block_size: int | None) -> int:
    """The band's query block size ``C`` (``block_size`` or the default), checked against ``L`` and ``w``."""
    C = block_size or default_block_size(w)
    if w <= 0 or C <= 0 or w % C or L % C or L % (2 * w):
        raise ValueError(
            f"band attention: sequence length {L} must be a multiple of the window 2w={2 * w}, "
            f"and the block size {C} must divide w={w}."
        )
    return C


# Largest default band block: below it the blocks' matrix products get too small to run well, above
# it the unused corners of the C x (C + 2w) score blocks cost more than they save.
MAX_DEFAULT_BLOCK = 128


def default_block_size(one_sided_window: int) -> int:
    """Query rows per band block when none is configured: the largest divisor of ``w`` up to 128.

    A block of ``C`` queries computes ``C x (C + 2w)`` scores for ``2w + 1`` useful columns per row,
    so smaller blocks waste less work but run smaller matrix products (window 512: C = 128, 25%
    extra columns instead of 50% with C = w)."""
    w = one_sided_window
    return max(c for c in range(1, min(w, MAX_DEFAULT_BLOCK) + 1) if w % c == 0) if w > 0 else w


# ------------------------------------------------------------------------------ the lean band
# The band as one custom-VJP function: the forward walks over chunks of query blocks and keeps
# only the output and two numbers per row (max and softmax denominator); the backward recomputes
# each chunk's scores. No (B, H, L, C + 2w) tensor outlives its chunk, forward or backward, so the
# memory of training grows with L * D, not L * w. Exact: the same products and the same float32
# softmax as the materialised path, only normalised after the value product.

# Query tokens per chunk: bounds the per-chunk score tensor (H x tokens x (C + 2w) floats).
BAND_CHUNK_TOKENS = 4096


def _chunk_blocks(N: int, C: int, chunk_tokens: int) -> int:
    """Blocks per chunk: the largest divisor of ``N`` with at most ``chunk_tokens`` queries."""
    best = 1
    for n in range(1, N + 1):
        if N % n == 0 and n * C <= max(chunk_tokens, C):
            best = n
    return best


class _Band(NamedTuple):
    """Static description of one band computation.

    ``causal``: the band of the ``w`` keys before each query and itself (``K = C + w`` keys per block);
    the global columns' visibility is then per query (``gvalid`` (B, L, G), see ``_global_bias``)."""

    w: int
    C: int
    blocks_per_chunk: int
    rate: float
    dtype: Any
    causal: bool = False


def _band_right(b: _Band) -> int | None:
    """The keys after the query: None for the two-sided band (``w``), 0 for the causal one."""
    return 0 if b.causal else None


def _band_span(b: _Band) -> int:
    """Key blocks per query block."""
    return (b.w if b.causal else 2 * b.w) // b.C + 1


def _global_bias(gvalid, G: int, C: int, causal: bool):
    """Additive bias of the ``G`` global columns: (B, 1, 1, 1, G) from ``gvalid`` (B, G) (slot holds a
    global token), or for the causal band (B, 1, N, C, G) from ``gvalid`` (B, L, G) (query sees slot)."""
    if G == 0:
        return None
    if not causal:
        return jnp.where(gvalid, 0.0, _MASKED)[:, None, None, None, :]
    B, L = gvalid.shape[:2]
    return jnp.where(gvalid, 0.0, _MASKED).reshape(B, 1, L // C, C, G)


def _chunk_global_bias(b: _Band, gbias, i):
    """The global columns' bias of chunk ``i``: per query for the causal band, else shared."""
    if gbias is None or not b.causal:
        return gbias
    return jax.lax.dynamic_slice_in_dim(gbias, i * b.blocks_per_chunk, b.blocks_per_chunk, axis=2)


def _chunk_inputs(b: _Band, i, q_BxHxNxCxD, kp_BxHxPxCxD, vp_BxHxPxCxD, state_BxPxC, qpad_BxNxC):
    """Queries, key/value windows, score bias and pad rows of chunk ``i``."""
    n, C, w = b.blocks_per_chunk, b.C, b.w
    span = _band_span(b)
    n0 = i * n
    q = jax.lax.dynamic_slice_in_dim(q_BxHxNxCxD, n0, n, axis=2)
    windows = lambda blocks, axis: _key_windows(
        jax.lax.dynamic_slice_in_dim(blocks, n0, n + span - 1, axis=axis), n, span, axis
    )
    kw, vw = windows(kp_BxHxPxCxD, 2), windows(vp_BxHxPxCxD, 2)
    bias = _window_bias(windows(state_BxPxC, 1), w, C, _band_right(b))[:, None]  # (B, 1, n, C, K)
    qpad = jax.lax.dynamic_slice_in_dim(qpad_BxNxC, n0, n, axis=1)[:, None, :, :, None]  # (B, 1, n, C, 1)
    return q, kw, vw, bias, qpad


def _chunk_scores(q, kw, bias, kg, gbias):
    s = jnp.einsum("bhncd,bhnkd->bhnck", q, kw, preferred_element_type=jnp.float32) + bias
    sg = None
    if kg is not None:
        sg = jnp.einsum("bhncd,bhgd->bhncg", q, kg, preferred_element_type=jnp.float32) + gbias
    return s, sg


def _keep_masks(b: _Band, rng, i, shape_b, G):
    keep = keep_mask(jax.random.fold_in(rng, i), b.rate, shape_b[:-1] + (G + shape_b[-1],))
    return keep[..., G:], keep[..., :G]


def _pack_bits(keep_Bx___xK: Array) -> Array:
    """Bool (..., K) -> uint8 (..., K / 8), eight mask entries per byte (K % 8 == 0)."""
    k8 = keep_Bx___xK.reshape(keep_Bx___xK.shape[:-1] + (-1, 8)).astype(jnp.uint8)
    return jnp.sum(k8 << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def _unpack_bits(packed_Bx___xK8: Array) -> Array:
    bits = (packed_Bx___xK8[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return bits.reshape(packed_Bx___xK8.shape[:-1] + (-1,)).astype(bool)


def _band_prepare(b: _Band, q, k, v, mask_BxL):
    """Query blocks, padded key/value/key-state blocks and the pad query rows of the whole sequence."""
    B, H, L, D = q.shape
    C, w, right = b.C, b.w, _band_right(b)
    kp, vp = _padded_blocks(k, w, C, axis=2, right=right), _padded_blocks(v, w, C, axis=2, right=right)
    state = _padded_blocks(_key_state(mask_BxL), w, C, axis=1, right=right)
    qpad = (mask_BxL == 0).reshape(B, L // C, C)
    return q.reshape(B, H, L // C, C, D), kp, vp, state, qpad


def _band_forward(b: _Band, q, k, v, kg, vg, gvalid, mask_BxL, rng):
    """Chunked forward: output (B, H, L, D), per-row max and denominator, the dropout masks."""
    B, H, L, D = q.shape
    N = L // b.C
    n = b.blocks_per_chunk
    G = 0 if kg is None else kg.shape[2]
    qb, kp, vp, state, qpad = _band_prepare(b, q, k, v, mask_BxL)
    gbias = _global_bias(gvalid, G, b.C, b.causal)
    dropout = rng is not None and b.rate > 0.0

    def chunk(_, i):
        qc, kw, vw, bias, qp = _chunk_inputs(b, i, qb, kp, vp, state, qpad)
        s, sg = _chunk_scores(qc, kw, bias, kg, _chunk_global_bias(b, gbias, i))
        m = jnp.max(s, axis=-1)
        if G:
            m = jnp.maximum(m, jnp.max(sg, axis=-1))
        e = jnp.exp(s - m[..., None])
        den = jnp.sum(e, axis=-1)
        if G:
            eg = jnp.exp(sg - m[..., None])
            den = den + jnp.sum(eg, axis=-1)
        keeps = ()
        if dropout:
            keep_b, keep_g = _keep_masks(b, rng, i, e.shape, G)
            e = jnp.where(keep_b, e / (1.0 - b.rate), 0.0)
            if G:
                eg = jnp.where(keep_g, eg / (1.0 - b.rate), 0.0)
            # Saved for the backward pass: one bit per band score when the band width allows.
            keeps = (_pack_bits(keep_b) if keep_b.shape[-1] % 8 == 0 else keep_b, keep_g)
        o = jnp.einsum("bhnck,bhnkd->bhncd", e.astype(b.dtype), vw, preferred_element_type=jnp.float32)
        if G:
            o = o + jnp.einsum("bhncg,bhgd->bhncd", eg.astype(b.dtype), vg, preferred_element_type=jnp.float32)
        o = jnp.where(qp, 0.0, o / den[..., None]).astype(b.dtype)
        return None, (o, m, den) + keeps

    _, outs = jax.lax.scan(chunk, None, jnp.arange(N // n))
    o = jnp.moveaxis(outs[0], 0, 2).reshape(B, H, L, D)  # (nc, B, H, n, C, D) -> (B, H, L, D)
    return o, outs[1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lean_band(b: _Band, q, k, v, kg, vg, gvalid, mask_BxL, rng):
    return _band_forward(b, q, k, v, kg, vg, gvalid, mask_BxL, rng)[0]


def _lean_band_fwd(b, q, k, v, kg, vg, gvalid, mask_BxL, rng):
    o, stats = _band_forward(b, q, k, v, kg, vg, gvalid, mask_BxL, rng)
    return o, (q, k, v, kg, vg, gvalid, mask_BxL, rng, o, stats)


def _lean_band_bwd(b, res, do_BxHxLxD):
    q, k, v, kg, vg, gvalid, mask_BxL, rng, o, stats = res
    B, H, L, D = q.shape
    C, w, n = b.C, b.w, b.blocks_per_chunk
    N = L // C
    span = _band_span(b)
    G = 0 if kg is None else kg.shape[2]
    dropout = rng is not None and b.rate > 0.0
    qb, kp, vp, state, qpad = _band_prepare(b, q, k, v, mask_BxL)
    gbias = _global_bias(gvalid, G, b.C, b.causal)
    dob = do_BxHxLxD.reshape(B, H, N, C, D)
    ob = o.reshape(B, H, N, C, D)

    def fold(dw_Bxhxnx_KxD):
        """Window gradient (B, H, n, K, D) -> padded key blocks (B, H, n + span - 1, C, D)."""
        parts = dw_Bxhxnx_KxD.reshape(dw_Bxhxnx_KxD.shape[:3] + (span, C, D))
        acc = jnp.zeros(dw_Bxhxnx_KxD.shape[:2] + (n + span - 1, C, D), jnp.float32)
        for j in range(span):
            acc = acc.at[:, :, j : j + n].add(parts[:, :, :, j])
        return acc

    def chunk(carry, xs):
        dkp, dvp, dkg, dvg = carry
        i, m, den = xs[:3]
        keep_b, keep_g = (xs[3], xs[4]) if dropout else (None, None)
        if dropout and keep_b.dtype == jnp.uint8:
            keep_b = _unpack_bits(keep_b)
        qc, kw, vw, bias, qp = _chunk_inputs(b, i, qb, kp, vp, state, qpad)
        do = jnp.where(qp, 0.0, jax.lax.dynamic_slice_in_dim(dob, i * n, n, axis=2).astype(jnp.float32))
        oc = jax.lax.dynamic_slice_in_dim(ob, i * n, n, axis=2).astype(jnp.float32)
        s, sg = _chunk_scores(qc, kw, bias, kg, _chunk_global_bias(b, gbias, i))
        inv = 1.0 / den[..., None]
        p = jnp.exp(s - m[..., None]) * inv
        row = jnp.sum(do * oc, axis=-1, keepdims=True)  # sum_k P_ik dP_ik = dO_i . O_i
        scale = 1.0 / (1.0 - b.rate) if dropout else 1.0
        pd = jnp.where(keep_b, p * scale, 0.0) if dropout else p
        dvw = jnp.einsum(
            "bhnck,bhncd->bhnkd", pd.astype(b.dtype), do.astype(b.dtype), preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("bhncd,bhnkd->bhnck", do.astype(b.dtype), vw, preferred_element_type=jnp.float32)
        if dropout:
            dp = jnp.where(keep_b, dp * scale, 0.0)
        ds = p * (dp - row)
        dq = jnp.einsum("bhnck,bhnkd->bhncd", ds.astype(b.dtype), kw, preferred_element_type=jnp.float32)
        dkw = jnp.einsum("bhnck,bhncd->bhnkd", ds.astype(b.dtype), qc, preferred_element_type=jnp.float32)
        if G:
            pg = jnp.exp(sg - m[..., None]) * inv
            pgd = jnp.where(keep_g, pg * scale, 0.0) if dropout else pg
            dvg = dvg + jnp.einsum(
                "bhncg,bhncd->bhgd", pgd.astype(b.dtype), do.astype(b.dtype), preferred_element_type=jnp.float32
            )
            dpg = jnp.einsum("bhncd,bhgd->bhncg", do.astype(b.dtype), vg, preferred_element_type=jnp.float32)
            if dropout:
                dpg = jnp.where(keep_g, dpg * scale, 0.0)
            dsg = pg * (dpg - row)
            dq = dq + jnp.einsum("bhncg,bhgd->bhncd", dsg.astype(b.dtype), kg, preferred_element_type=jnp.float32)
            dkg = dkg + jnp.einsum("bhncg,bhncd->bhgd", dsg.astype(b.dtype), qc, preferred_element_type=jnp.float32)
        n0 = i * n
        upd = lambda acc, dw: jax.lax.dynamic_update_slice_in_dim(
            acc, jax.lax.dynamic_slice_in_dim(acc, n0, n + span - 1, axis=2) + fold(dw), n0, axis=2
        )
        return (upd(dkp, dkw), upd(dvp, dvw), dkg, dvg), dq

    P = N + span - 1
    zeros_p = jnp.zeros((B, H, P, C, D), jnp.float32)
    zeros_g = jnp.zeros((B, H, G, D), jnp.float32)
    xs = (jnp.arange(N // n),) + tuple(stats)
    (dkp, dvp, dkg, dvg), dq = jax.lax.scan(chunk, (zeros_p, zeros_p, zeros_g, zeros_g), xs)
    dq = jnp.moveaxis(dq, 0, 2).reshape(B, H, L, D).astype(q.dtype)
    dk = dkp.reshape(B, H, P * C, D)[:, :, w : w + L].astype(k.dtype)
    dv = dvp.reshape(B, H, P * C, D)[:, :, w : w + L].astype(v.dtype)
    dkg = None if kg is None else dkg.astype(kg.dtype)
    dvg = None if vg is None else dvg.astype(vg.dtype)
    return dq, dk, dv, dkg, dvg, None, None, None


_lean_band.defvjp(_lean_band_fwd, _lean_band_bwd)


def lean_band_attention_heads(
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    slots: GlobalSlots | None = None,
    *,
    block_size: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    chunk_tokens: int | None = None,
    dilation: int | Sequence[int] = 1,
    causal: bool = False,
) -> Array:
    """The band plus global columns (head-major), in chunks, with a recomputing backward pass.

    Same result as ``sliding_window_attention_heads`` (without the probabilities), ``dilation`` and
    ``causal`` included; memory of the forward and backward grows with ``L * D`` instead of
    ``L * (C + 2w)``. The causal band computes ``C + w`` scores per query instead of ``C + 2w``."""
    kg, vg = _global_keys(k_BxHxLxD, v_BxHxLxD, slots)
    global_kv = None if kg is None else (kg, vg, global_visibility(slots, q_BxHxLxD.shape[2], causal))
    return lean_band_with_global_keys_heads(
        q_BxHxLxD,
        k_BxHxLxD,
        v_BxHxLxD,
        mask_BxL,
        one_sided_window,
        global_kv,
        block_size=block_size,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        chunk_tokens=chunk_tokens,
        dilation=dilation,
        causal=causal,
    )


def lean_band_with_global_keys_heads(
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    global_kv: tuple[Array, Array, Array] | None = None,
    *,
    block_size: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    chunk_tokens: int | None = None,
    dilation: int | Sequence[int] = 1,
    causal: bool = False,
) -> Array:
    """``lean_band_attention_heads`` with the global columns given instead of gathered from ``k`` and ``v``.

    ``global_kv``: ``(kg_BxHxGxD, vg_BxHxGxD, visible)``, the local keys and values of the global tokens
    and which of them the queries see: (B, G) (the slot holds a token), or when ``causal`` (B, L, G) per
    query (``global_visibility``); None: no global columns. For a band computed on a piece of a sequence
    whose global tokens may lie in other pieces (``longformer_jax.sequence_parallel``); the numbers are
    those of ``lean_band_attention_heads`` for the same columns. The two-sided undilated band runs the
    chunked band directly, the other patterns through ``band_pattern_on``."""
    kg, vg, visible = global_kv if global_kv is not None else (None, None, None)
    run = functools.partial(
        _lean_band_on, block_size=block_size, dropout_rate=dropout_rate, chunk_tokens=chunk_tokens, causal=causal
    )
    if is_plain_band(dilation, causal):
        return run(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_BxL, one_sided_window, kg, vg, visible, dropout_rng)[0]
    return band_pattern_on(
        run, q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_BxL, one_sided_window, kg, vg, visible, dilation, causal, dropout_rng
    )[0]


def _lean_band_on(
    q, k, v, mask_BxL, w, kg, vg, gvalid, dropout_rng, *, block_size, dropout_rate, chunk_tokens, causal, rows_per_row=1
) -> tuple[Array, None]:
    """``lean_band_attention_heads`` on given global keys/values and their visibility (``_global_bias``).

    ``rows_per_row``: the subsequence rows each input row was cut into (the dilation); the chunks then
    hold as many queries in all as for the undilated band."""
    C = _band_block_size(q.shape[2], w, block_size)
    N = q.shape[2] // C
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    tokens = (chunk_tokens or BAND_CHUNK_TOKENS) // rows_per_row
    b = _Band(w, C, _chunk_blocks(N, C, tokens), rate, v.dtype, causal)
    return _lean_band(b, q, k, v, kg, vg, gvalid, mask_BxL, dropout_rng if rate > 0.0 else None), None


# ------------------------------------------------------------------------------ dilated and causal bands
# A dilated band is an ordinary band on subsequences: with dilation d, the positions i = m*d + r with the
# same residue r form a subsequence of L / d tokens, and the keys i + d*k of query i are the keys m + k
# of its subsequence. So the sequence axis is cut into (L / d, d), the residue moved next to the batch
# (B * d rows of L / d tokens) and the ordinary blocked band runs on that: exact, no gather, the same
# work as the undilated band. Heads of different dilations run apart, each group on its own reshape.


def is_plain_band(dilation: int | Sequence[int] = 1, causal: bool = False) -> bool:
    """Whether the band is transformers' own: two-sided and undilated on every head."""
    return not causal and all(d == 1 for d in np.atleast_1d(np.asarray(dilation)).tolist())


def dilation_groups(dilation: int | Sequence[int], num_heads: int) -> list[tuple[int, tuple[int, ...]]]:
    """``[(d, heads), ...]``: the heads of each dilation, in the order the dilations first appear.

    ``dilation`` is one int for every head or a sequence of one int (>= 1) per head; a ValueError otherwise."""
    per_head = [dilation] * num_heads if isinstance(dilation, (int, np.integer)) else list(dilation)
    if len(per_head) != num_heads or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in per_head):
        raise ValueError(f"dilation={dilation!r}: give an int >= 1, or one int >= 1 per head ({num_heads} heads).")
    groups: dict[int, list[int]] = {}
    for h, d in enumerate(per_head):
        groups.setdefault(int(d), []).append(h)
    return [(d, tuple(heads)) for d, heads in groups.items()]


def to_residues(x: Array, d: int, axis: int) -> Array:
    """(B, ..., L, ...) -> (B * d, ..., L / d, ...): row ``b * d + r`` holds positions ``r, r + d, ...`` of row b."""
    B, L = x.shape[0], x.shape[axis]
    x = x.reshape(x.shape[:axis] + (L // d, d) + x.shape[axis + 1 :])
    x = jnp.moveaxis(x, axis + 1, 1)
    return x.reshape((B * d,) + x.shape[2:])


def from_residues(x: Array, d: int, axis: int) -> Array:
    """The inverse of ``to_residues``: (B * d, ..., L / d, ...) -> (B, ..., L, ...)."""
    x = x.reshape((x.shape[0] // d, d) + x.shape[1:])
    x = jnp.moveaxis(x, 1, axis + 1)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * d,) + x.shape[axis + 2 :])


def _take_heads(x: Array | None, heads: tuple[int, ...], num_heads: int) -> Array | None:
    """The heads ``heads`` of a head-major array (a slice when they are consecutive)."""
    if x is None or len(heads) == num_heads:
        return x
    if heads == tuple(range(heads[0], heads[-1] + 1)):
        return x[:, heads[0] : heads[-1] + 1]
    return jnp.take(x, np.asarray(heads), axis=1)


def global_visibility(slots: GlobalSlots, length: int, causal: bool) -> Array:
    """Which global slots the local queries see: ``slots.valid_BxG``, or when ``causal`` (B, L, G): query
    ``i`` sees the global keys at positions ``j <= i``."""
    if not causal:
        return slots.valid_BxG
    pos_1xLx1 = jnp.arange(length)[None, :, None]
    return slots.valid_BxG[:, None, :] & (slots.index_BxG[:, None, :] <= pos_1xLx1)


def band_pattern(
    run: Callable[..., tuple[Array, Array | None]],
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    slots: GlobalSlots | None,
    dilation: int | Sequence[int],
    causal: bool,
    dropout_rng: Array | None,
) -> tuple[Array, Array | None]:
    """A dilated and/or causal band: ``run`` on each dilation group of heads, on its residue subsequences.

    ``run(q, k, v, mask, w, kg, vg, gvalid, rng, rows_per_row=d) -> (out (B', h, L', D), probs (B', h, L', W)
    or None)`` is an ordinary (two-sided or causal) band with the global keys/values ``kg``, ``vg``
    (B', h, G, D) given and ``gvalid`` their visibility (``global_visibility``); it is called with
    ``B' = B * d`` rows of ``L' = L / d`` tokens (``rows_per_row`` omitted when ``d`` is 1). The global
    keys (those of ``slots``) stay columns of every query (those ``j <= i`` when causal). Returns the output
    (B, H, L, D) and the probabilities (B, H, L, W) in HF's layout (column ``G + w + k`` the key ``i + d*k``),
    or None."""
    kg, vg = _global_keys(k_BxHxLxD, v_BxHxLxD, slots)
    gvalid = None if kg is None else global_visibility(slots, q_BxHxLxD.shape[2], causal)
    return band_pattern_on(
        run, q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_BxL, one_sided_window, kg, vg, gvalid, dilation, causal, dropout_rng
    )


def band_pattern_on(
    run: Callable[..., tuple[Array, Array | None]],
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    kg_BxHxGxD: Array | None,
    vg_BxHxGxD: Array | None,
    gvalid: Array | None,
    dilation: int | Sequence[int],
    causal: bool,
    dropout_rng: Array | None,
) -> tuple[Array, Array | None]:
    """``band_pattern`` on given global keys/values (B, H, G, D) and their visibility ``gvalid`` ((B, G), or
    (B, L, G) per query when ``causal``), e.g. those of global tokens held by other devices."""
    B, H, L, D = q_BxHxLxD.shape
    w = one_sided_window
    groups = dilation_groups(dilation, H)
    for d, _ in groups:
        if w > 0 and L % (2 * w * d):
            raise ValueError(
                f"band attention: sequence length {L} must be a multiple of the window 2w={2 * w} times the "
                f"dilation {d} ({2 * w * d}); pad the inputs (prepare_inputs pads to config.pad_multiple)."
            )
    outs, probs, order = [], [], []
    for n, (d, heads) in enumerate(groups):
        pick = lambda x, heads=heads: _take_heads(x, heads, H)
        rng = dropout_rng if dropout_rng is None or len(groups) == 1 else jax.random.fold_in(dropout_rng, n)
        out, p = _on_residues(
            run,
            d,
            pick(q_BxHxLxD),
            pick(k_BxHxLxD),
            pick(v_BxHxLxD),
            mask_BxL,
            w,
            pick(kg_BxHxGxD),
            pick(vg_BxHxGxD),
            gvalid,
            rng,
            causal,
        )
        outs.append(out)
        probs.append(p)
        order.extend(heads)
    if len(groups) == 1:
        return outs[0], probs[0]
    back = np.argsort(order)  # the heads back in their own order
    out = jnp.take(jnp.concatenate(outs, axis=1), back, axis=1)
    prob = None if probs[0] is None else jnp.take(jnp.concatenate(probs, axis=1), back, axis=1)
    return out, prob


def _on_residues(run, d: int, q, k, v, mask_BxL, w, kg, vg, gvalid, rng, causal: bool):
    """``run`` on the ``d`` residue subsequences of every row (itself when ``d`` is 1), results put back."""
    if d == 1:
        return run(q, k, v, mask_BxL, w, kg, vg, gvalid, rng)
    rows = lambda x: None if x is None else jnp.repeat(x, d, axis=0)  # row b -> rows b*d .. b*d + d - 1
    if gvalid is not None:
        gvalid = to_residues(gvalid, d, 1) if causal else rows(gvalid)
    q, k, v = (to_residues(x, d, 2) for x in (q, k, v))
    out, p = run(q, k, v, to_residues(mask_BxL, d, 1), w, rows(kg), rows(vg), gvalid, rng, rows_per_row=d)
    return from_residues(out, d, 2), None if p is None else from_residues(p, d, 2)


def _global_keys(k_BxHxLxD: Array, v_BxHxLxD: Array, slots: GlobalSlots | None) -> tuple[Array | None, Array | None]:
    """The local keys and values of the global tokens, (B, H, G, D) each; None without global slots."""
    if slots is None or slots.index_BxG.shape[1] == 0:
        return None, None
    index = slots.index_BxG[:, None, :, None]
    return jnp.take_along_axis(k_BxHxLxD, index, axis=2), jnp.take_along_axis(v_BxHxLxD, index, axis=2)


def sliding_window_attention_heads(
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    slots: GlobalSlots | None = None,
    *,
    block_size: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_probs: bool = False,
    dilation: int | Sequence[int] = 1,
    causal: bool = False,
) -> tuple[Array, Array | None]:
    """Local attention of every query (head-major): the band of ``w`` keys each side plus the global keys.

    ``q`` is already scaled by ``1/sqrt(D)``; all of ``q``, ``k``, ``v`` are (B, H, L, D).
    ``mask_BxL``: 0 pad, 1 local, 2 global (HF's merged mask). Pad and global keys are removed from
    the band; the global keys (``slots``) are added as ``G`` extra columns with the local key/value
    projections. Returns the output (B, H, L, D) (zero on pad rows) and, if asked, the probabilities
    in HF's layout (B, H, L, G + 2w + 1). Rows of global queries are returned as computed here; the
    caller replaces them (``scatter_global_rows_heads``).

    ``dilation`` (an int, or one per head) and ``causal`` choose another band (see ``band_pattern``):
    query ``i`` sees the keys ``i + d*k`` for ``k`` in ``-w .. w`` (``-w .. 0`` when causal), and when
    causal only the global keys ``j <= i``. The probabilities keep HF's layout: column ``G + w + k`` is the
    key ``i + d*k`` (zero for ``k > 0`` when causal).

    The softmax is normalised after the value product: ``out = (e @ v) / sum(e)`` with
    ``e = exp(s - max)``, so the (B, H, N, C, K) score tensor is written once and read twice,
    and the masks are one additive bias shared by the heads."""
    if not is_plain_band(dilation, causal):
        run = functools.partial(
            _materialised_band,
            block_size=block_size,
            dropout_rate=dropout_rate,
            return_probs=return_probs,
            causal=causal,
        )
        return band_pattern(
            run, q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_BxL, one_sided_window, slots, dilation, causal, dropout_rng
        )
    return _materialised_band(
        q_BxHxLxD,
        k_BxHxLxD,
        v_BxHxLxD,
        mask_BxL,
        one_sided_window,
        None,
        None,
        None,
        dropout_rng,
        block_size=block_size,
        dropout_rate=dropout_rate,
        return_probs=return_probs,
        slots=slots,
    )


def _materialised_band(
    q_BxHxLxD,
    k_BxHxLxD,
    v_BxHxLxD,
    mask_BxL,
    w,
    kg_BxHxGxD,
    vg_BxHxGxD,
    gvalid,
    dropout_rng,
    *,
    block_size,
    dropout_rate,
    return_probs,
    causal=False,
    rows_per_row=1,
    slots: GlobalSlots | None = None,
) -> tuple[Array, Array | None]:
    """``sliding_window_attention_heads`` on given global keys/values (B, H, G, D) and their visibility
    ``gvalid`` ((B, G), or (B, L, G) per query when ``causal``; see ``_global_bias``), or on those of
    ``slots`` (taken from ``k``, ``v``). ``rows_per_row`` is for the signature of ``band_pattern``'s
    ``run`` (this path has no chunks)."""
    del rows_per_row
    B, H, L, D = q_BxHxLxD.shape
    C = _band_block_size(L, w, block_size)
    N = L // C
    dtype = v_BxHxLxD.dtype
    right = 0 if causal else None
    span = w // C + 1 if causal else 2 * w // C + 1

    q_BxHxNxCxD = q_BxHxLxD.reshape(B, H, N, C, D)
    windows = lambda x_BxHxLxD: _key_windows(_padded_blocks(x_BxHxLxD, w, C, axis=2, right=right), N, span, axis=2)
    k_BxHxNxKxD, v_BxHxNxKxD = windows(k_BxHxLxD), windows(v_BxHxLxD)
    s_BxHxNxCxK = jnp.einsum(
        "bhncd,bhnkd->bhnck", q_BxHxNxCxD, k_BxHxNxKxD, preferred_element_type=jnp.float32
    ) + band_bias(mask_BxL, w, C, right)
    m_BxHxNxC = jnp.max(s_BxHxNxCxK, axis=-1)

    if slots is not None:
        kg_BxHxGxD, vg_BxHxGxD = _global_keys(k_BxHxLxD, v_BxHxLxD, slots)
        gvalid = None if kg_BxHxGxD is None else slots.valid_BxG
    G = 0 if kg_BxHxGxD is None else kg_BxHxGxD.shape[2]
    if G:
        sg_BxHxNxCxG = jnp.einsum(
            "bhncd,bhgd->bhncg", q_BxHxNxCxD, kg_BxHxGxD, preferred_element_type=jnp.float32
        ) + _global_bias(gvalid, G, C, causal)
        m_BxHxNxC = jnp.maximum(m_BxHxNxC, jnp.max(sg_BxHxNxCxG, axis=-1))
    # The softmax does not depend on the shift: no gradient flows through the max.
    m_BxHxNxCx1 = jax.lax.stop_gradient(m_BxHxNxC)[..., None]
    e_BxHxNxCxK = jnp.exp(s_BxHxNxCxK - m_BxHxNxCx1)
    den_BxHxNxC = jnp.sum(e_BxHxNxCxK, axis=-1)
    if G:
        eg_BxHxNxCxG = jnp.exp(sg_BxHxNxCxG - m_BxHxNxCx1)
        den_BxHxNxC = den_BxHxNxC + jnp.sum(eg_BxHxNxCxG, axis=-1)

    if dropout_rng is not None and dropout_rate > 0.0:
        # One draw over the (global columns, band) row, as for a concatenated probability tensor.
        row_shape = e_BxHxNxCxK.shape[:-1] + (G + e_BxHxNxCxK.shape[-1],)
        keep = keep_mask(dropout_rng, dropout_rate, row_shape)
        drop = lambda x, kp: apply_mask(kp, dropout_rate, x)
        e_used = drop(e_BxHxNxCxK, keep[..., G:])
        eg_used = drop(eg_BxHxNxCxG, keep[..., :G]) if G else None
    else:
        e_used, eg_used = e_BxHxNxCxK, (eg_BxHxNxCxG if G else None)
    out_BxHxNxCxD = jnp.einsum(
        "bhnck,bhnkd->bhncd", e_used.astype(dtype), v_BxHxNxKxD, preferred_element_type=jnp.float32
    )
    if G:
        out_BxHxNxCxD += jnp.einsum(
            "bhncg,bhgd->bhncd", eg_used.astype(dtype), vg_BxHxGxD, preferred_element_type=jnp.float32
        )
    out_BxHxNxCxD = out_BxHxNxCxD / den_BxHxNxC[..., None]
    is_pad_Bx1xLx1 = (mask_BxL == 0)[:, None, :, None]
    out_BxHxLxD = jnp.where(is_pad_Bx1xLx1, 0.0, out_BxHxNxCxD.reshape(B, H, L, D)).astype(dtype)

    probs = None
    if return_probs:
        inv = 1.0 / den_BxHxNxC[..., None]
        q_pad = (mask_BxL == 0).reshape(B, 1, N, C, 1)
        band = band_to_hf_layout(jnp.where(q_pad, 0.0, e_BxHxNxCxK * inv), w, right)
        if causal:  # HF's layout all the same: zero columns for the keys after the query
            band = jnp.pad(band, ((0, 0), (0, 0), (0, 0), (0, w)))
        if G:
            pg = jnp.where(q_pad, 0.0, eg_BxHxNxCxG * inv).reshape(B, H, L, G)
            probs = jnp.concatenate([pg, band], axis=-1)
        else:
            probs = band
    return out_BxHxLxD, probs


def _global_query_keys(mask_BxL: Array, slots: GlobalSlots, causal: bool) -> Array:
    """(B, 1, G, L) bool: the keys of each global query (every non-pad key; when causal those ``j <= i``)."""
    keep = slots.valid_BxG[:, None, :, None] & (mask_BxL != 0)[:, None, None, :]
    if causal:
        keep = keep & (jnp.arange(mask_BxL.shape[1])[None, None, None, :] <= slots.index_BxG[:, None, :, None])
    return keep


def global_query_attention_heads(
    qg_BxHxGxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    slots: GlobalSlots,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    causal: bool = False,
) -> tuple[Array, Array]:
    """Global queries (``G`` slots, global projections, scaled) over every non-pad key, head-major.

    ``qg`` (B, H, G, D); ``k``, ``v`` (B, H, L, D), the global key/value projections of every token.
    Returns the output (B, H, G, D) and the probabilities (B, H, G, L). Empty slots and pad keys are
    filled with float32's min as HF does (an empty slot's row is uniform, and unused). ``causal``: a
    global query at position ``i`` sees only the keys ``j <= i``."""
    dtype = v_BxHxLxD.dtype
    s_BxHxGxL = jnp.einsum("bhgd,bhld->bhgl", qg_BxHxGxD, k_BxHxLxD, preferred_element_type=jnp.float32)
    keep = _global_query_keys(mask_BxL, slots, causal)
    s_BxHxGxL = jnp.where(keep, s_BxHxGxL, _MASKED)
    p_BxHxGxL = jax.nn.softmax(s_BxHxGxL, axis=-1)
    p_drop = dropout(dropout_rng, dropout_rate, p_BxHxGxL)
    out_BxHxGxD = jnp.einsum(
        "bhgl,bhld->bhgd", p_drop.astype(dtype), v_BxHxLxD, preferred_element_type=jnp.float32
    ).astype(dtype)
    return out_BxHxGxD, p_BxHxGxL


def reassociate_global(num_slots: int, num_heads: int, hidden_size: int) -> bool:
    """Whether ``global_query_attention_from_hidden_heads`` does less work than projecting every key.

    Projecting the global keys and values of all ``L`` tokens costs ``2 L E^2``; folding the
    projections into the ``G`` global queries instead costs about ``2 L H G E``, so it pays while
    ``H G < E + G`` (``G`` up to 69 for the base model's 12 heads of 64)."""
    return 0 < num_slots and num_heads * num_slots < hidden_size + num_slots


def global_query_attention_from_hidden_heads(
    qg_BxHxGxD: Array,
    h_BxLxE: Array,
    key_kernel_ExE: Array,
    key_bias_E: Array,
    value_kernel_ExE: Array,
    value_bias_E: Array,
    mask_BxL: Array,
    slots: GlobalSlots,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    causal: bool = False,
) -> tuple[Array, Array]:
    """``global_query_attention_heads`` with the global key/value projections folded into the queries.

    With ``k_l = h_l Wk + bk`` and ``v_l = h_l Wv + bv`` (per head ``h``, columns ``h*D .. h*D+D-1``):
    ``q . k_l = (q Wk_h^T) . h_l + q . bk_h`` and ``sum_l p_l v_l = (sum_l p_l h_l) Wv_h + (sum_l p_l) bv_h``,
    so the ``L x E`` global keys and values are never formed: the ``G`` queries of every head become
    ``E``-wide and meet the hidden states in two ``(H G) x E x L`` products. The same numbers as
    projecting every key (up to float rounding); outputs (B, H, G, D) and probabilities (B, H, G, L)."""
    B, H, G, D = qg_BxHxGxD.shape
    E = h_BxLxE.shape[-1]
    dtype = h_BxLxE.dtype
    wk_ExHxD = key_kernel_ExE.astype(dtype).reshape(E, H, D)
    wv_ExHxD = value_kernel_ExE.astype(dtype).reshape(E, H, D)
    qk_BxHxGxE = jnp.einsum("bhgd,ehd->bhge", qg_BxHxGxD, wk_ExHxD, preferred_element_type=jnp.float32)
    q_bias_BxHxG = jnp.einsum(
        "bhgd,hd->bhg", qg_BxHxGxD, key_bias_E.astype(dtype).reshape(H, D), preferred_element_type=jnp.float32
    )
    s_BxHxGxL = jnp.einsum("bhge,ble->bhgl", qk_BxHxGxE.astype(dtype), h_BxLxE, preferred_element_type=jnp.float32)
    s_BxHxGxL = s_BxHxGxL + q_bias_BxHxG[..., None]
    keep = _global_query_keys(mask_BxL, slots, causal)
    s_BxHxGxL = jnp.where(keep, s_BxHxGxL, _MASKED)
    p_BxHxGxL = jax.nn.softmax(s_BxHxGxL, axis=-1)
    p_drop = dropout(dropout_rng, dropout_rate, p_BxHxGxL)
    ph_BxHxGxE = jnp.einsum("bhgl,ble->bhge", p_drop.astype(dtype), h_BxLxE, preferred_element_type=jnp.float32)
    out_BxHxGxD = jnp.einsum("bhge,ehd->bhgd", ph_BxHxGxE.astype(dtype), wv_ExHxD, preferred_element_type=jnp.float32)
    # sum_l p_l is 1 without dropout; with it, the bias is weighted by what the mask kept.
    out_BxHxGxD = (
        out_BxHxGxD
        + jnp.sum(p_drop, axis=-1)[..., None] * value_bias_E.astype(jnp.float32).reshape(H, D)[None, :, None, :]
    )
    return out_BxHxGxD.astype(dtype), p_BxHxGxL


def scatter_global_rows_heads(out_BxHxLxD: Array, rows_BxHxGxD: Array, slots: GlobalSlots) -> Array:
    """Write the global queries' outputs (B, H, G, D) over their rows of (B, H, L, D) (empty slots write nothing)."""
    B, _, L = out_BxHxLxD.shape[:3]
    index = jnp.where(slots.valid_BxG, slots.index_BxG, L)  # L: out of bounds -> dropped
    # Advanced indices around a slice: the indexed sub-array is laid out (B, G, H, D).
    rows_BxGxHxD = jnp.swapaxes(rows_BxHxGxD, 1, 2)
    return out_BxHxLxD.at[jax.lax.broadcasted_iota(jnp.int32, (B, 1), 0), :, index].set(rows_BxGxHxD, mode="drop")


def dense_attention_mask(
    mask_BxL: Array,
    one_sided_window: int,
    num_heads: int,
    *,
    dilation: int | Sequence[int] = 1,
    causal: bool = False,
) -> tuple[Array, Array]:
    """The keys each query may attend, as dense (B, H, L, L) bool arrays: (local rows, global rows).

    The statement of every pattern, with ``d`` the head's dilation:
    - a local (non-global, non-pad) query ``i`` sees the local keys ``j = i + d*k``, ``-w <= k <= w``
      (``k <= 0`` when causal), and every global key (when causal, those ``j <= i``);
    - a global query ``i`` sees every non-pad key (when causal, those ``j <= i``);
    - a pad query sees nothing (its output is zero).
    The first array holds the local rows' keys on every row; the second the global rows' keys."""
    L = mask_BxL.shape[1]
    w = one_sided_window
    per_head = [1] * num_heads
    for d, heads in dilation_groups(dilation, num_heads):
        for h in heads:
            per_head[h] = d
    d_Hx1x1 = jnp.asarray(per_head)[:, None, None]
    diff_LxL = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]  # i - j
    band_HxLxL = (jnp.abs(diff_LxL) <= w * d_Hx1x1) & (diff_LxL % d_Hx1x1 == 0)
    before_LxL = diff_LxL >= 0
    if causal:
        band_HxLxL = band_HxLxL & before_LxL
    allowed_1x1xLxL = before_LxL[None, None] if causal else jnp.ones((1, 1, L, L), bool)
    is_global_Bx1x1xL = (mask_BxL == 2)[:, None, None, :]
    local = (band_HxLxL[None] & (mask_BxL == 1)[:, None, None, :]) | (is_global_Bx1x1xL & allowed_1x1xLxL)
    global_rows = (mask_BxL != 0)[:, None, None, :] & allowed_1x1xLxL
    return local, jnp.broadcast_to(global_rows, local.shape)


def attention_pattern_mask(
    mask_BxL: Array,
    one_sided_window: int,
    num_heads: int,
    *,
    dilation: int | Sequence[int] = 1,
    causal: bool = False,
) -> Array:
    """(B, H, L, L) bool: query ``i`` attends key ``j`` (``dense_attention_mask``, rows by the query's kind)."""
    local, global_rows = dense_attention_mask(mask_BxL, one_sided_window, num_heads, dilation=dilation, causal=causal)
    row_Bx1xLx1 = mask_BxL[:, None, :, None]
    return jnp.where(row_Bx1xLx1 == 2, global_rows, local) & (row_Bx1xLx1 != 0)


def dense_attention(
    q_BxLxHxD: Array,
    k_BxLxHxD: Array,
    v_BxLxHxD: Array,
    qg_BxLxHxD: Array,
    kg_BxLxHxD: Array,
    vg_BxLxHxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    *,
    dilation: int | Sequence[int] = 1,
    causal: bool = False,
) -> tuple[Array, Array]:
    """The O(L^2) reference: the SPEC's dense statement, for tests only.

    Takes the local and global projections of every position (queries scaled). Returns the output
    (B, L, H, D) and the (B, H, L, L) probabilities of every row (global rows: the global ones).
    ``dilation`` (an int or one per head) and ``causal``: the patterns of ``dense_attention_mask``.
    """
    H = q_BxLxHxD.shape[2]
    is_pad = mask_BxL == 0
    is_global = mask_BxL == 2
    local_keys, global_keys = dense_attention_mask(mask_BxL, one_sided_window, H, dilation=dilation, causal=causal)
    s_local = jnp.einsum("bihd,bjhd->bhij", q_BxLxHxD, k_BxLxHxD)
    s_local = jnp.where(local_keys, s_local, -jnp.inf)
    s_global = jnp.einsum("bihd,bjhd->bhij", qg_BxLxHxD, kg_BxLxHxD)
    # A global query always sees itself; the rows of other queries are not used (kept finite).
    s_global = jnp.where(global_keys | ~is_global[:, None, :, None], s_global, -jnp.inf)
    p_local = jax.nn.softmax(jnp.where(is_pad[:, None, :, None], 0.0, s_local), axis=-1)
    p_global = jax.nn.softmax(s_global, axis=-1)
    out_local = jnp.einsum("bhij,bjhd->bihd", p_local, v_BxLxHxD)
    out_global = jnp.einsum("bhij,bjhd->bihd", p_global, vg_BxLxHxD)
    out = jnp.where(is_global[:, :, None, None], out_global, out_local)
    out = jnp.where(is_pad[:, :, None, None], 0.0, out)
    p = jnp.where(is_global[:, None, :, None], p_global, p_local)
    p = jnp.where(is_pad[:, None, :, None], 0.0, p)
    return out, p
