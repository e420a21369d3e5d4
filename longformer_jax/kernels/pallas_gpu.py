"""The band plus global columns as Pallas GPU (Triton) kernels: one forward, a dQ and a dK/dV backward.

Started from ``jax.experimental.pallas.ops.gpu.attention`` (flash attention: an online softmax over
key tiles, the log-sum-exp kept for a recomputing backward pass), changed to Longformer's pattern:

- Query tile ``[i0, i0 + bq)`` visits only the key tiles that meet its band ``[i0 - w, i0 + bq + w)``:
  ``ceil((bq + 2w) / bk)`` tiles, whatever the sequence length. A tile that would start before the
  sequence or end after it is clamped into it, and only its own columns count (so no key is seen twice).
- The ``G`` global keys come first, as a prefix tile of the key rows (padded to a power of two with
  empty slots of score ``-inf``), in the same online softmax as the band: one float32 log-sum-exp per
  row covers both, so the backward kernels get the merged output and the merged log-sum-exp and the
  gradients are exact (nothing is merged outside the kernels).
- Scores take the blocked path's additive bias: 0 for a local key in the band, float32's min for a pad or
  global key in the band or an empty slot, ``-inf`` outside the band or the sequence. The running max
  starts at float32's min, so a row whose every key is masked is uniform over them, as HF and the
  blocked path make it. Pad query rows give zero.
- Dropout on the probabilities happens inside the kernels (``kernels.common.keep``: a hash of the row
  and HF column, recomputed in the backward kernels; the denominator is the undropped one).
- The backward: ``dQ`` per query tile over the same key tiles (it also writes the global keys' and
  values' gradient of the tile, summed over tiles outside), ``dK``/``dV`` per key tile over the query
  tiles that meet its band.

On a CPU the kernels run in Pallas interpret mode (``interpret=True``), which is how they are tested.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longformer_jax.attention import GlobalSlots
from longformer_jax.kernels import common
from longformer_jax.kernels.common import MASKED

Array = jax.Array

# Triton's matrix products need every tile side to be a power of two of at least 16.
MIN_TILE = 16


class _Spec(NamedTuple):
    """Static description of one kernel call (hashable: it is a non-differentiable argument)."""

    w: int  # keys on each side of the query
    G: int  # global slots (HF's global columns)
    Gp: int  # rows of the global prefix tile (0 without globals)
    L: int  # padded sequence length
    bq: int  # query rows per tile
    bk: int  # key rows per tile
    rate: float  # dropout rate (0: none)
    interpret: bool
    num_warps: int
    num_stages: int

    @property
    def width(self) -> int:  # HF columns of a row: G global, then 2w + 1 band
        return self.G + 2 * self.w + 1


def default_tiles(length: int, w: int) -> tuple[int, int]:
    """Query and key rows per tile: 64 x 64 (the band of w = 64 then fills 2/3 of the visited scores)."""
    tile = 64
    while tile > MIN_TILE and tile > common.next_power_of_2(max(length, 1)):
        tile //= 2
    return tile, tile


def _dot(a: Array, b: Array) -> Array:
    """``a @ b`` accumulated in float32 (Triton multiplies float32 inputs in full float32 by default)."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _band_bias(rows: Array, cols: Array, own: Array, key_is_local: Array, w: int) -> Array:
    """Additive bias of a (rows x cols) tile of the band; ``own`` marks the entries this tile counts."""
    d = cols[None, :] - rows[:, None]
    in_band = own & (d >= -w) & (d <= w)
    return jnp.where(in_band, jnp.where(key_is_local[None, :], 0.0, MASKED), -jnp.inf)


def _band_keep(s: _Spec, stream, rows: Array, cols: Array):
    if not s.rate:
        return None
    return common.keep(stream, rows[:, None], s.G + s.w + cols[None, :] - rows[:, None], s.width, s.rate)


def _prefix_keep(s: _Spec, stream, rows: Array):
    if not s.rate:
        return None
    return common.keep(stream, rows[:, None], jnp.arange(s.Gp, dtype=jnp.int32)[None, :], s.width, s.rate)


def _online_update(s: _Spec, carry, scores: Array, v: Array, keep):
    """One key tile of the online softmax (FlashAttention-2): running max, denominator, output."""
    m, l, acc = carry
    m_next = jnp.maximum(m, jnp.max(scores, axis=1))
    alpha = jnp.exp(m - m_next)
    p = jnp.exp(scores - m_next[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    if keep is not None:
        p = jnp.where(keep, p * common.dropout_scale(s.rate), 0.0)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return m_next, l, acc


def _split_refs(s: _Spec, refs, n_front: int, n_out: int):
    """(front refs, (kg, vg, gbias) or None, stream ref or None, output refs)."""
    front, rest = refs[:n_front], list(refs[n_front:])
    prefix = None
    if s.Gp:
        prefix, rest = tuple(rest[:3]), rest[3:]
    seed = None
    if s.rate:
        seed, rest = rest[0], rest[1:]
    assert len(rest) == n_out
    return front, prefix, seed, rest


def _forward_kernel(*refs, s: _Spec):
    (q_ref, k_ref, v_ref, mask_ref), prefix, seed_ref, (o_ref, lse_ref) = _split_refs(s, refs, 4, 2)
    i0 = pl.program_id(0) * s.bq
    rows = i0 + jnp.arange(s.bq, dtype=jnp.int32)
    q = q_ref[...]
    stream = seed_ref[()] if seed_ref is not None else None
    carry = (
        jnp.full((s.bq,), MASKED, jnp.float32),
        jnp.zeros((s.bq,), jnp.float32),
        jnp.zeros((s.bq, q.shape[-1]), jnp.float32),
    )
    if prefix is not None:
        kg_ref, vg_ref, gbias_ref = prefix
        scores = _dot(q, kg_ref[...].T) + gbias_ref[...][None, :]
        carry = _online_update(s, carry, scores, vg_ref[...], _prefix_keep(s, stream, rows))

    def body(t, carry):
        lo = i0 - s.w + t * s.bk
        start = jnp.clip(lo, 0, s.L - s.bk)
        cols = start + jnp.arange(s.bk, dtype=jnp.int32)
        own = ((cols >= lo) & (cols < lo + s.bk))[None, :]
        key_is_local = mask_ref[pl.ds(start, s.bk)] == 1
        scores = _dot(q, k_ref[pl.ds(start, s.bk), :].T) + _band_bias(rows, cols, own, key_is_local, s.w)
        return _online_update(s, carry, scores, v_ref[pl.ds(start, s.bk), :], _band_keep(s, stream, rows, cols))

    m, l, acc = lax.fori_loop(0, pl.cdiv(s.bq + 2 * s.w, s.bk), body, carry)
    is_pad = mask_ref[pl.ds(i0, s.bq)] == 0
    o_ref[...] = jnp.where(is_pad[:, None], 0.0, acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _grad_tile(s: _Spec, scores: Array, lse: Array, delta: Array, dp: Array, keep):
    """(dS, dropped P) of a tile from the merged log-sum-exp and ``delta = rowsum(dO * O)``."""
    p = jnp.exp(scores - lse[:, None])
    pd = p
    if keep is not None:
        scale = common.dropout_scale(s.rate)
        pd = jnp.where(keep, p * scale, 0.0)
        dp = jnp.where(keep, dp * scale, 0.0)
    return p * (dp - delta[:, None]), pd


def _dq_kernel(*refs, s: _Spec):
    n_out = 3 if s.Gp else 1
    front, prefix, seed_ref, outs = _split_refs(s, refs, 7, n_out)
    q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref = front
    i0 = pl.program_id(0) * s.bq
    rows = i0 + jnp.arange(s.bq, dtype=jnp.int32)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    stream = seed_ref[()] if seed_ref is not None else None
    dq = jnp.zeros(q.shape, jnp.float32)
    if prefix is not None:
        kg_ref, vg_ref, gbias_ref = prefix
        kg, vg = kg_ref[...], vg_ref[...]
        scores = _dot(q, kg.T) + gbias_ref[...][None, :]
        ds, pd = _grad_tile(s, scores, lse, delta, _dot(do, vg.T), _prefix_keep(s, stream, rows))
        dq = dq + _dot(ds.astype(kg.dtype), kg)
        outs[1][...] = _dot(ds.astype(q.dtype).T, q)
        outs[2][...] = _dot(pd.astype(do.dtype).T, do)

    def body(t, dq):
        lo = i0 - s.w + t * s.bk
        start = jnp.clip(lo, 0, s.L - s.bk)
        cols = start + jnp.arange(s.bk, dtype=jnp.int32)
        own = ((cols >= lo) & (cols < lo + s.bk))[None, :]
        key_is_local = mask_ref[pl.ds(start, s.bk)] == 1
        k = k_ref[pl.ds(start, s.bk), :]
        scores = _dot(q, k.T) + _band_bias(rows, cols, own, key_is_local, s.w)
        dp = _dot(do, v_ref[pl.ds(start, s.bk), :].T)
        ds, _ = _grad_tile(s, scores, lse, delta, dp, _band_keep(s, stream, rows, cols))
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, pl.cdiv(s.bq + 2 * s.w, s.bk), body, dq)
    outs[0][...] = dq.astype(outs[0].dtype)


def _dkv_kernel(*refs, s: _Spec):
    front, _, seed_ref, (dk_ref, dv_ref) = _split_refs(s._replace(Gp=0), refs, 7, 2)
    q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref = front
    j0 = pl.program_id(0) * s.bk
    cols = j0 + jnp.arange(s.bk, dtype=jnp.int32)
    k, v = k_ref[...], v_ref[...]
    key_is_local = mask_ref[pl.ds(j0, s.bk)] == 1
    stream = seed_ref[()] if seed_ref is not None else None

    def body(t, carry):
        dk, dv = carry
        lo = j0 - s.w + t * s.bq
        start = jnp.clip(lo, 0, s.L - s.bq)
        rows = start + jnp.arange(s.bq, dtype=jnp.int32)
        own = ((rows >= lo) & (rows < lo + s.bq))[:, None]
        q, do = q_ref[pl.ds(start, s.bq), :], do_ref[pl.ds(start, s.bq), :]
        scores = _dot(q, k.T) + _band_bias(rows, cols, own, key_is_local, s.w)
        ds, pd = _grad_tile(
            s,
            scores,
            lse_ref[pl.ds(start, s.bq)],
            delta_ref[pl.ds(start, s.bq)],
            _dot(do, v.T),
            _band_keep(s, stream, rows, cols),
        )
        return dk + _dot(ds.astype(q.dtype).T, q), dv + _dot(pd.astype(do.dtype).T, do)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, pl.cdiv(s.bk + 2 * s.w, s.bq), body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------- calls
def _call(kernel, s: _Spec, grid_tiles: int, in_specs, out_specs, out_shape, args):
    return pl.pallas_call(
        functools.partial(kernel, s=s),
        grid=(grid_tiles,) + args[0].shape[:2],
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=s.num_warps, num_stages=s.num_stages),
        interpret=s.interpret,
        name=kernel.__name__.strip("_"),
    )(*args)


def _extra_specs(s: _Spec, D: int):
    specs = []
    if s.Gp:
        whole_g = pl.BlockSpec((None, None, s.Gp, D), lambda n, b, h: (b, h, 0, 0))
        specs += [whole_g, whole_g, pl.BlockSpec((None, s.Gp), lambda n, b, h: (b, 0))]
    if s.rate:
        specs.append(pl.BlockSpec((None, None), lambda n, b, h: (b, h)))
    return specs


def _extra_args(s: _Spec, kg, vg, gbias, seeds):
    return ((kg, vg, gbias) if s.Gp else ()) + ((seeds,) if s.rate else ())


def _forward(s: _Spec, q, k, v, mask, kg, vg, gbias, seeds):
    B, H, L, D = q.shape
    q_tile = pl.BlockSpec((None, None, s.bq, D), lambda n, b, h: (b, h, n, 0))
    seq = pl.BlockSpec((None, None, L, D), lambda n, b, h: (b, h, 0, 0))
    mask_spec = pl.BlockSpec((None, L), lambda n, b, h: (b, 0))
    in_specs = [q_tile, seq, seq, mask_spec] + _extra_specs(s, D)
    out_specs = [q_tile, pl.BlockSpec((None, None, s.bq), lambda n, b, h: (b, h, n))]
    out_shape = [jax.ShapeDtypeStruct((B, H, L, D), v.dtype), jax.ShapeDtypeStruct((B, H, L), jnp.float32)]
    args = (q, k, v, mask) + _extra_args(s, kg, vg, gbias, seeds)
    o, lse = _call(_forward_kernel, s, L // s.bq, in_specs, out_specs, out_shape, args)
    return o, lse


def _backward(s: _Spec, res, do):
    q, k, v, mask, kg, vg, gbias, seeds, o, lse = res
    B, H, L, D = q.shape
    do = jnp.where((mask == 0)[:, None, :, None], 0.0, do.astype(jnp.float32))
    delta = jnp.sum(do * o.astype(jnp.float32), axis=-1)
    do = do.astype(v.dtype)
    seq = pl.BlockSpec((None, None, L, D), lambda n, b, h: (b, h, 0, 0))
    row_seq = pl.BlockSpec((None, None, L), lambda n, b, h: (b, h, 0))
    mask_spec = pl.BlockSpec((None, L), lambda n, b, h: (b, 0))
    extra = _extra_args(s, kg, vg, gbias, seeds)

    # dQ (and the global prefix's dK, dV of each query tile).
    q_tile = pl.BlockSpec((None, None, s.bq, D), lambda n, b, h: (b, h, n, 0))
    row_tile = pl.BlockSpec((None, None, s.bq), lambda n, b, h: (b, h, n))
    in_specs = [q_tile, seq, seq, mask_spec, q_tile, row_tile, row_tile] + _extra_specs(s, D)
    out_specs = [q_tile]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if s.Gp:
        part = pl.BlockSpec((None, None, None, s.Gp, D), lambda n, b, h: (b, h, n, 0, 0))
        out_specs += [part, part]
        out_shape += [jax.ShapeDtypeStruct((B, H, L // s.bq, s.Gp, D), jnp.float32)] * 2
    outs = _call(_dq_kernel, s, L // s.bq, in_specs, out_specs, out_shape, (q, k, v, mask, do, lse, delta) + extra)
    dq = outs[0]
    dkg = dvg = None
    if s.Gp:
        dkg = jnp.sum(outs[1], axis=2).astype(kg.dtype)
        dvg = jnp.sum(outs[2], axis=2).astype(vg.dtype)

    # dK, dV of the band, per key tile.
    k_tile = pl.BlockSpec((None, None, s.bk, D), lambda n, b, h: (b, h, n, 0))
    in_specs = [seq, k_tile, k_tile, mask_spec, seq, row_seq, row_seq] + _extra_specs(s._replace(Gp=0), D)
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    seed_arg = (seeds,) if s.rate else ()
    dk, dv = _call(
        _dkv_kernel, s, L // s.bk, in_specs, [k_tile, k_tile], out_shape, (q, k, v, mask, do, lse, delta) + seed_arg
    )
    zeros_gbias = None if gbias is None else jnp.zeros_like(gbias)
    return dq, dk, dv, None, dkg, dvg, zeros_gbias, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _band(s: _Spec, q, k, v, mask, kg, vg, gbias, seeds):
    return _forward(s, q, k, v, mask, kg, vg, gbias, seeds)[0]


def _band_fwd(s, q, k, v, mask, kg, vg, gbias, seeds):
    o, lse = _forward(s, q, k, v, mask, kg, vg, gbias, seeds)
    return o, (q, k, v, mask, kg, vg, gbias, seeds, o, lse)


_band.defvjp(_band_fwd, _backward)


def band_attention(
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    slots: GlobalSlots | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    dropout_streams_BxH: Array | None = None,
    tiles: tuple[int, int] | None = None,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Array:
    """``attention.lean_band_attention_heads`` (same arguments, same output) as Pallas GPU kernels.

    ``tiles``: query and key rows per tile (powers of two >= 16; default :func:`default_tiles`). The
    sequence is padded to a multiple of the tiles and the head dimension to a power of two >= 16 (pad
    tokens, zero features); neither changes the result. Dropout (``dropout_rate > 0``) needs
    ``dropout_rng`` or the streams it stands for, ``common.dropout_streams(rng, B, H)`` (given by a caller
    that runs shards of the batch, so that a row draws the same mask on any number of devices)."""
    B, H, L, D = q_BxHxLxD.shape
    w = one_sided_window
    bq, bk = tiles or default_tiles(L, w)
    for t in (bq, bk):
        if t < MIN_TILE or t != common.next_power_of_2(t):
            raise ValueError(f"pallas-gpu band attention: tiles={tiles} must be powers of two >= {MIN_TILE}.")
    Lp = common.round_up(L, max(bq, bk))
    Dp = max(MIN_TILE, common.next_power_of_2(D))
    pad = lambda x: common.pad_to(common.pad_to(x, 2, Lp), 3, Dp)
    q, k, v = pad(q_BxHxLxD), pad(k_BxHxLxD), pad(v_BxHxLxD)
    mask = common.pad_to(mask_BxL.astype(jnp.int32), 1, Lp)
    G = common.num_slots(slots)
    Gp = max(MIN_TILE, common.next_power_of_2(G)) if G else 0
    kg = vg = gbias = None
    if G:
        kg, vg = common.global_prefix(k, v, slots)
        kg, vg = common.pad_to(kg, 2, Gp), common.pad_to(vg, 2, Gp)
        gbias = jnp.where(slots.valid_BxG, 0.0, MASKED).astype(jnp.float32)
        gbias = common.pad_to(gbias, 1, Gp, -jnp.inf)
    seeds = dropout_streams_BxH
    if seeds is None and dropout_rng is not None:
        seeds = common.dropout_streams(dropout_rng, B, H)
    rate = float(dropout_rate) if seeds is not None else 0.0
    seeds = seeds if rate > 0.0 else None
    s = _Spec(w, G, Gp, Lp, bq, bk, rate, bool(interpret), num_warps, num_stages)
    o = _band(s, q, k, v, mask, kg, vg, gbias, seeds)
    return o[:, :, :L, :D]
