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
shared by the heads; the softmax is normalised after the value product. Global queries:
``global_query_attention_heads`` (or ``..._from_hidden_heads``, projections folded into the
queries), their rows written over the band's by ``scatter_global_rows_heads``.

``dense_attention`` is the O(L^2) statement of the same thing, used by the tests.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
    index_BxG = index_BxG.at[jnp.arange(B)[:, None], slot_BxL].set(pos_BxL, mode="drop")[:, :num_slots]
    valid_BxG = jnp.arange(num_slots)[None, :] < count_B[:, None]
    index_BxG = jnp.where(valid_BxG, index_BxG, 0)
    return GlobalSlots(index_BxG, valid_BxG, count_B > num_slots)


# ------------------------------------------------------------------------------ band windows and bias
# Query block n (queries n*C .. n*C + C - 1) sees the keys n*C - w .. n*C + C - 1 + w: with the
# sequence padded by w zeros each side and cut into blocks of C, that is the span = 2w / C + 1
# consecutive key blocks n .. n + span - 1.


def _padded_blocks(x: Array, w: int, C: int, axis: int) -> Array:
    """``x`` with ``w`` zeros each side of its sequence axis, cut into blocks: (..., L / C + 2w / C, C, ...)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (w, w)
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


def _window_bias(state_Bx___xK: Array, w: int, C: int) -> Array:
    """Additive score bias (..., C, C + 2w) float32 of query blocks whose key windows have ``state``.

    0 for a local key inside the band; float32's min for a pad or global key inside the band (HF
    adds it: ``score + min == min`` in float32, so adding equals HF's fill); ``-inf`` outside the
    band or the sequence (exactly zero probability)."""
    K = C + 2 * w
    r = jnp.arange(C)[:, None]
    kk = jnp.arange(K)[None, :]
    in_band_CxK = (kk >= r) & (kk <= r + 2 * w)
    state = state_Bx___xK[..., None, :]
    return jnp.where(
        in_band_CxK & (state > 0), jnp.where(state == 2, 0.0, _MASKED), _OUTSIDE
    ).astype(jnp.float32)


def band_to_hf_layout(p_BxHxNxCxK: Array, w: int) -> Array:
    """Blocked band probabilities -> HF layout (B, H, L, 2w+1), column ``w`` the query itself."""
    B, H, N, C, K = p_BxHxNxCxK.shape
    cols = jnp.arange(C)[:, None] + jnp.arange(2 * w + 1)[None, :]  # (C, W): key r + c of row r
    p = jnp.take_along_axis(p_BxHxNxCxK, jnp.broadcast_to(cols, (B, H, N, C, 2 * w + 1)), axis=-1)
    return p.reshape(B, H, N * C, 2 * w + 1)


def band_bias(mask_BxL: Array, one_sided_window: int, block_size: int) -> Array:
    """Additive score bias of the blocked band, (B, 1, N, C, C + 2w) float32 (see ``_window_bias``)."""
    w, C = one_sided_window, block_size
    N = mask_BxL.shape[1] // C
    state_Bx1xL = _key_state(mask_BxL)[:, None]  # a size-1 head axis: the bias is shared by the heads
    state_Bx1xNxK = _key_windows(_padded_blocks(state_Bx1xL, w, C, axis=2), N, 2 * w // C + 1, axis=2)
    return _window_bias(state_Bx1xNxK, w, C)


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
    """Static description of one band computation."""

    w: int
    C: int
    blocks_per_chunk: int
    rate: float
    dtype: Any


def _chunk_inputs(b: _Band, i, q_BxHxNxCxD, kp_BxHxPxCxD, vp_BxHxPxCxD, state_BxPxC, qpad_BxNxC):
    """Queries, key/value windows, score bias and pad rows of chunk ``i``."""
    n, C, w = b.blocks_per_chunk, b.C, b.w
    span = 2 * w // C + 1
    n0 = i * n
    q = jax.lax.dynamic_slice_in_dim(q_BxHxNxCxD, n0, n, axis=2)
    windows = lambda blocks, axis: _key_windows(
        jax.lax.dynamic_slice_in_dim(blocks, n0, n + span - 1, axis=axis), n, span, axis
    )
    kw, vw = windows(kp_BxHxPxCxD, 2), windows(vp_BxHxPxCxD, 2)
    bias = _window_bias(windows(state_BxPxC, 1), w, C)[:, None]  # (B, 1, n, C, K)
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
    C, w = b.C, b.w
    kp, vp = _padded_blocks(k, w, C, axis=2), _padded_blocks(v, w, C, axis=2)
    state = _padded_blocks(_key_state(mask_BxL), w, C, axis=1)
    qpad = (mask_BxL == 0).reshape(B, L // C, C)
    return q.reshape(B, H, L // C, C, D), kp, vp, state, qpad


def _band_forward(b: _Band, q, k, v, kg, vg, gvalid, mask_BxL, rng):
    """Chunked forward: output (B, H, L, D), per-row max and denominator, the dropout masks."""
    B, H, L, D = q.shape
    N = L // b.C
    n = b.blocks_per_chunk
    G = 0 if kg is None else kg.shape[2]
    qb, kp, vp, state, qpad = _band_prepare(b, q, k, v, mask_BxL)
    gbias = None if G == 0 else jnp.where(gvalid, 0.0, _MASKED)[:, None, None, None, :]
    dropout = rng is not None and b.rate > 0.0

    def chunk(_, i):
        qc, kw, vw, bias, qp = _chunk_inputs(b, i, qb, kp, vp, state, qpad)
        s, sg = _chunk_scores(qc, kw, bias, kg, gbias)
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
    span = 2 * w // C + 1
    G = 0 if kg is None else kg.shape[2]
    dropout = rng is not None and b.rate > 0.0
    qb, kp, vp, state, qpad = _band_prepare(b, q, k, v, mask_BxL)
    gbias = None if G == 0 else jnp.where(gvalid, 0.0, _MASKED)[:, None, None, None, :]
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
        s, sg = _chunk_scores(qc, kw, bias, kg, gbias)
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
            dvg = dvg + jnp.einsum("bhncg,bhncd->bhgd", pgd.astype(b.dtype), do.astype(b.dtype),
                                   preferred_element_type=jnp.float32)
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
    q_BxHxLxD: Array, k_BxHxLxD: Array, v_BxHxLxD: Array, mask_BxL: Array, one_sided_window: int,
    slots: GlobalSlots | None = None, *, block_size: int | None = None, dropout_rate: float = 0.0,
    dropout_rng: Array | None = None, chunk_tokens: int | None = None,
) -> Array:
    """The band plus global columns (head-major), in chunks, with a recomputing backward pass.

    Same result as ``sliding_window_attention_heads`` (without the probabilities); memory of the
    forward and backward grows with ``L * D`` instead of ``L * (C + 2w)``."""
    w = one_sided_window
    C = _band_block_size(q_BxHxLxD.shape[2], w, block_size)
    N = q_BxHxLxD.shape[2] // C
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    b = _Band(w, C, _chunk_blocks(N, C, chunk_tokens or BAND_CHUNK_TOKENS), rate, v_BxHxLxD.dtype)
    kg, vg = _global_keys(k_BxHxLxD, v_BxHxLxD, slots)
    gvalid = None if kg is None else slots.valid_BxG
    rng = dropout_rng if rate > 0.0 else None
    return _lean_band(b, q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, kg, vg, gvalid, mask_BxL, rng)


def lean_band_with_global_keys_heads(
    q_BxHxLxD: Array, k_BxHxLxD: Array, v_BxHxLxD: Array, mask_BxL: Array, one_sided_window: int,
    global_kv: tuple[Array, Array, Array] | None = None, *, block_size: int | None = None,
    dropout_rate: float = 0.0, dropout_rng: Array | None = None, chunk_tokens: int | None = None,
) -> Array:
    """``lean_band_attention_heads`` with the global columns given instead of gathered from ``k`` and ``v``.

    ``global_kv``: ``(kg_BxHxGxD, vg_BxHxGxD, valid_BxG)``, the local keys and values of the global tokens
    and which slots hold one (None: no global columns). For a band computed on a piece of a sequence
    whose global tokens may lie in other pieces (``longformer_jax.sequence_parallel``); the numbers
    are those of ``lean_band_attention_heads`` for the same columns."""
    kg, vg, gvalid = global_kv if global_kv is not None else (None, None, None)
    L, w = q_BxHxLxD.shape[2], one_sided_window
    C = _band_block_size(L, w, block_size)
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    spec = _Band(w, C, _chunk_blocks(L // C, C, chunk_tokens or BAND_CHUNK_TOKENS), rate, v_BxHxLxD.dtype)
    return _lean_band(spec, q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, kg, vg, gvalid, mask_BxL,
                      dropout_rng if rate > 0.0 else None)


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
) -> tuple[Array, Array | None]:
    """Local attention of every query (head-major): the band of ``w`` keys each side plus the global keys.

    ``q`` is already scaled by ``1/sqrt(D)``; all of ``q``, ``k``, ``v`` are (B, H, L, D).
    ``mask_BxL``: 0 pad, 1 local, 2 global (HF's merged mask). Pad and global keys are removed from
    the band; the global keys (``slots``) are added as ``G`` extra columns with the local key/value
    projections. Returns the output (B, H, L, D) (zero on pad rows) and, if asked, the probabilities
    in HF's layout (B, H, L, G + 2w + 1). Rows of global queries are returned as computed here; the
    caller replaces them (``scatter_global_rows_heads``).

    The softmax is normalised after the value product: ``out = (e @ v) / sum(e)`` with
    ``e = exp(s - max)``, so the (B, H, N, C, K) score tensor is written once and read twice,
    and the masks are one additive bias shared by the heads."""
    B, H, L, D = q_BxHxLxD.shape
    w = one_sided_window
    C = _band_block_size(L, w, block_size)
    N = L // C
    dtype = v_BxHxLxD.dtype

    q_BxHxNxCxD = q_BxHxLxD.reshape(B, H, N, C, D)
    windows = lambda x_BxHxLxD: _key_windows(_padded_blocks(x_BxHxLxD, w, C, axis=2), N, 2 * w // C + 1, axis=2)
    k_BxHxNxKxD, v_BxHxNxKxD = windows(k_BxHxLxD), windows(v_BxHxLxD)
    s_BxHxNxCxK = jnp.einsum(
        "bhncd,bhnkd->bhnck", q_BxHxNxCxD, k_BxHxNxKxD, preferred_element_type=jnp.float32
    ) + band_bias(mask_BxL, w, C)
    m_BxHxNxC = jnp.max(s_BxHxNxCxK, axis=-1)

    kg_BxHxGxD, vg_BxHxGxD = _global_keys(k_BxHxLxD, v_BxHxLxD, slots)
    G = 0 if kg_BxHxGxD is None else kg_BxHxGxD.shape[2]
    if G:
        sg_BxHxNxCxG = jnp.einsum(
            "bhncd,bhgd->bhncg", q_BxHxNxCxD, kg_BxHxGxD, preferred_element_type=jnp.float32
        ) + jnp.where(slots.valid_BxG, 0.0, _MASKED)[:, None, None, None, :]
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
        band = band_to_hf_layout(jnp.where(q_pad, 0.0, e_BxHxNxCxK * inv), w)
        if G:
            pg = jnp.where(q_pad, 0.0, eg_BxHxNxCxG * inv).reshape(B, H, L, G)
            probs = jnp.concatenate([pg, band], axis=-1)
        else:
            probs = band
    return out_BxHxLxD, probs


def global_query_attention_heads(
    qg_BxHxGxD: Array, k_BxHxLxD: Array, v_BxHxLxD: Array, mask_BxL: Array, slots: GlobalSlots, *,
    dropout_rate: float = 0.0, dropout_rng: Array | None = None,
) -> tuple[Array, Array]:
    """Global queries (``G`` slots, global projections, scaled) over every non-pad key, head-major.

    ``qg`` (B, H, G, D); ``k``, ``v`` (B, H, L, D), the global key/value projections of every token.
    Returns the output (B, H, G, D) and the probabilities (B, H, G, L). Empty slots and pad keys are
    filled with float32's min as HF does (an empty slot's row is uniform, and unused)."""
    dtype = v_BxHxLxD.dtype
    s_BxHxGxL = jnp.einsum("bhgd,bhld->bhgl", qg_BxHxGxD, k_BxHxLxD, preferred_element_type=jnp.float32)
    keep = slots.valid_BxG[:, None, :, None] & (mask_BxL != 0)[:, None, None, :]
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
    keep = slots.valid_BxG[:, None, :, None] & (mask_BxL != 0)[:, None, None, :]
    s_BxHxGxL = jnp.where(keep, s_BxHxGxL, _MASKED)
    p_BxHxGxL = jax.nn.softmax(s_BxHxGxL, axis=-1)
    p_drop = dropout(dropout_rng, dropout_rate, p_BxHxGxL)
    ph_BxHxGxE = jnp.einsum("bhgl,ble->bhge", p_drop.astype(dtype), h_BxLxE, preferred_element_type=jnp.float32)
    out_BxHxGxD = jnp.einsum("bhge,ehd->bhgd", ph_BxHxGxE.astype(dtype), wv_ExHxD, preferred_element_type=jnp.float32)
    # sum_l p_l is 1 without dropout; with it, the bias is weighted by what the mask kept.
    out_BxHxGxD = out_BxHxGxD + jnp.sum(p_drop, axis=-1)[..., None] * value_bias_E.astype(jnp.float32).reshape(H, D)[
        None, :, None, :
    ]
    return out_BxHxGxD.astype(dtype), p_BxHxGxL


def scatter_global_rows_heads(out_BxHxLxD: Array, rows_BxHxGxD: Array, slots: GlobalSlots) -> Array:
    """Write the global queries' outputs (B, H, G, D) over their rows of (B, H, L, D) (empty slots write nothing)."""
    B, _, L = out_BxHxLxD.shape[:3]
    index = jnp.where(slots.valid_BxG, slots.index_BxG, L)  # L: out of bounds -> dropped
    # Advanced indices around a slice: the indexed sub-array is laid out (B, G, H, D).
    rows_BxGxHxD = jnp.swapaxes(rows_BxHxGxD, 1, 2)
    return out_BxHxLxD.at[jnp.arange(B)[:, None], :, index].set(rows_BxGxHxD, mode="drop")


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
