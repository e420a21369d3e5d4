"""Sequence parallelism: the one home of the attention of a document split over devices.

A mesh axis "sequence" (``longformer_jax.sharding.SEQUENCE_AXIS``) splits every document's ``L``
tokens into ``n`` contiguous pieces of ``L / n``, one per device. Everything but the attention
works token by token (embeddings, projections, feed-forward, LayerNorm, the MLM head, the loss
sums) and runs on each piece as GSPMD lays the inputs out; a layer's self-attention is where the
pieces meet. Under a mesh whose "sequence" axis has more than one device (``jax.set_mesh``, as
the mesh driver traces its steps), ``LongformerSelfAttention`` calls :func:`self_attention_heads`,
which runs on each device in a ``jax.shard_map`` over the "sequence" axis (and the batch axes):

* the band: each device receives the last ``h`` rows of its left neighbour and the first ``h`` of
  its right neighbour (keys, values and mask: ``jax.lax.ppermute``; zeros past the ends of the
  document, masked as pads) and computes the blocked band
  (``attention.lean_band_with_global_keys_heads``) on [left halo | own rows | right halo],
  keeping its own rows (the halo rows' outputs are computed and dropped). ``h`` is the one-sided
  window ``w``; with dilated windows (``attention_dilation``, per layer or per head) ``w`` times the
  dilations' least common multiple (:func:`halo_rows`: the farthest key ``i + d*w``, and the pieces
  keep the residues mod ``d`` of the whole sequence, so the dilated band, an ordinary band on every
  residue subsequence, runs on the extended piece as on one device). A causal band
  (``causal_attention``) needs the left halo only;
* the global columns of the band: the local keys and values of the ``G`` global tokens, wherever
  they lie, taken by the device that holds each and summed over the axis (a ``psum`` of rows that
  are zero elsewhere: an all-gather of ``G`` rows, exact);
* the global queries (the global q over every non-pad key; when causal, those before the query):
  scores against the device's own keys, the row maxima combined with ``pmax``, the softmax
  denominators and the weighted sums of the values with ``psum``; the device that holds a global
  token writes its row.

The numbers are those of one device (SPEC.md's dense statement: pad and global keys out of the
band, pad rows zero, float32 softmax): a key past the ends of the document is masked as HF masks
pads (float32's min instead of ``-inf``), which gives every kept row the same zero probability.
Per device and layer the memory is that of its ``L / n`` rows, plus ``2h`` halo rows and the
``G`` global rows.

Requirements: the padded length a multiple of ``n x 2w`` for every layer's window, times its
dilation (``config.pad_multiple``; else a ValueError), the blocked band (``attention_implementation``
"blocked", or "auto", which takes it here; a kernel is refused). ``output_attentions=True`` keeps
the one-device path (GSPMD then lays out the whole probabilities), for inspection rather than for
long documents.

Dropout: each device draws its attention masks from the layer's key folded with its index on the
mesh, so the masks are deterministic and independent across devices, but they are not those of
one device; only without attention dropout are the numbers one device's. (The hidden dropout
between the layers is drawn by GSPMD for the whole (B, L, E) array on every device: with it, a
device's temporaries hold that array's random bits; see bench/sequence_parallel.py --dropout.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from longformer_jax import attention as attn
from longformer_jax.attention import GlobalSlots
from longformer_jax.dropout import dropout
from longformer_jax.kernels import batch_shard_axes
from longformer_jax.sharding import SEQUENCE_AXIS

Array = jax.Array

# HF's fill for masked scores (attention._MASKED): a row with every key masked is uniform, never NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)
# The band implementations a sequence-parallel layer runs ("auto" takes the blocked band here).
IMPLEMENTATIONS = ("blocked", "auto")


def sequence_devices() -> int:
    """Devices on the "sequence" axis of the ambient mesh (``jax.set_mesh``); 1 without one.

    Also 1 inside a ``shard_map`` that has made the axis manual (the pieces are then local)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return 1
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if types[SEQUENCE_AXIS] == jax.sharding.AxisType.Manual:
        return 1
    return int(mesh.shape[SEQUENCE_AXIS])


def halo_rows(one_sided_window: int, dilation: int | Sequence[int] = 1) -> int:
    """Rows a device needs from each neighbour for a layer's band: ``w`` times the dilations' least common
    multiple (a dilated key ``i + d*k`` lies up to ``d*w`` away; a multiple of every ``d`` keeps the
    positions' residues mod ``d`` those of the whole sequence)."""
    return one_sided_window * math.lcm(*(int(d) for d in np.atleast_1d(np.asarray(dilation)).tolist()))


def check_sequence_split(
    length: int, attention_window: int, devices: int, implementation: str = "blocked", dilation: int | Sequence[int] = 1
) -> None:
    """A ValueError naming the fix unless a padded ``length`` splits into whole (dilated) windows over ``devices``,
    and the band's ``implementation`` has a sequence-parallel form."""
    multiple = 2 * halo_rows(attention_window // 2, dilation)  # the window, times the dilation
    step = devices * multiple
    if length % step:
        dilated = f" x its dilation {multiple // attention_window}" if multiple != attention_window else ""
        raise ValueError(
            f"sequence parallelism over {devices} devices: the padded sequence length {length} must be a multiple "
            f"of {devices} x the attention window {attention_window}{dilated} = {step}, so that every device holds "
            f"whole windows; pad the inputs (--seq-len) to a multiple of {step}, or use fewer devices on the "
            "sequence axis (--mesh sequence=N)."
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention_implementation={implementation!r} has no sequence-parallel form (its kernel sees whole "
            "sequences); under a mesh with a sequence axis use attention_implementation='blocked' or 'auto'."
        )


# ------------------------------------------------------------------------------ inside the shard_map
def _owned(slots: GlobalSlots, length: int) -> tuple[Array, Array]:
    """(position within this device's piece, whether this device holds the slot's token), (B, G) each."""
    start = jax.lax.axis_index(SEQUENCE_AXIS) * length
    own_BxG = slots.valid_BxG & (slots.index_BxG >= start) & (slots.index_BxG < start + length)
    return jnp.where(own_BxG, slots.index_BxG - start, 0), own_BxG


def _gather_owned(x: Array, index_BxG: Array, own_BxG: Array, axis: int) -> Array:
    """The rows ``index`` of ``x`` along ``axis`` (the token axis), from the devices that hold them.

    Every device takes its own rows, zeros the others, and the pieces are summed over the axis:
    exact (a sum with zeros), and the result is the same on every device."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = index_BxG.shape
    rows = jnp.take_along_axis(x, index_BxG.reshape(shape), axis=axis)
    return jax.lax.psum(jnp.where(own_BxG.reshape(shape), rows, jnp.zeros((), x.dtype)), SEQUENCE_AXIS)


def _with_halo(x: Array, left: int, right: int, axis: int, devices: int) -> Array:
    """[last ``left`` rows of the left neighbour | x | first ``right`` rows of the right one] along ``axis``.

    The first device's left halo and the last one's right halo are zeros (``ppermute`` fills a
    device nothing is sent to with zeros): pads, for a mask."""
    n = x.shape[axis]
    parts = [x]
    if left:
        to_right = [(i, i + 1) for i in range(devices - 1)]
        parts.insert(0, jax.lax.ppermute(jax.lax.slice_in_dim(x, n - left, n, axis=axis), SEQUENCE_AXIS, to_right))
    if right:
        to_left = [(i + 1, i) for i in range(devices - 1)]
        parts.append(jax.lax.ppermute(jax.lax.slice_in_dim(x, 0, right, axis=axis), SEQUENCE_AXIS, to_left))
    return jnp.concatenate(parts, axis=axis)


def _band(
    q, k, v, mask_BxL, w: int, devices: int, global_kv, *, dilation, causal: bool, block_size, dropout_rate, dropout_rng
) -> Array:
    """This device's rows of the band (B, H, L/n, D): the blocked band over its rows and the halos.

    The halos are ``halo_rows`` each side (the left one only for the causal band, whose keys all lie
    before the query; zeros fill the right end up to a whole window). The halo rows' outputs are dropped."""
    Lp, h = q.shape[2], halo_rows(w, dilation)
    right = 0 if causal else h
    tail = (-(Lp + h + right)) % (2 * h)  # the band runs on whole (dilated) windows
    ext = lambda x, axis: _pad_axis(_with_halo(x, h, right, axis, devices), axis, 0, tail)
    if global_kv is not None and causal:
        # Query i sees the global keys j <= i: the positions of the extended rows in the whole sequence.
        kg, vg, (index_BxG, valid_BxG) = global_kv
        pos_1xTx1 = (jax.lax.axis_index(SEQUENCE_AXIS) * Lp - h + jnp.arange(Lp + h + tail))[None, :, None]
        global_kv = (kg, vg, valid_BxG[:, None, :] & (index_BxG[:, None, :] <= pos_1xTx1))
    elif global_kv is not None:
        global_kv = (*global_kv[:2], global_kv[2][1])
    out = attn.lean_band_with_global_keys_heads(
        _pad_axis(q, 2, h, right + tail),
        ext(k, 2),
        ext(v, 2),
        ext(mask_BxL, 1),
        w,
        global_kv,
        block_size=block_size,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        dilation=dilation,
        causal=causal,
    )
    return out[:, :, h : h + Lp]


def _pad_axis(x: Array, axis: int, before: int, after: int) -> Array:
    """``x`` with ``before`` and ``after`` zeros along ``axis``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (before, after)
    return jnp.pad(x, pad) if before or after else x


def _global_scores(qg, x, key_global, reassociate: bool) -> Array:
    """Scores (B, H, G, L/n) float32 of the global queries against this device's keys (global projections).

    ``reassociate``: fold the key projection into the queries (as
    ``attention.global_query_attention_from_hidden_heads``), else project the keys (as the model does)."""
    B, H, G, D = qg.shape
    wk, bk = (a.astype(x.dtype) for a in key_global)
    if reassociate:
        qk_BxHxGxE = jnp.einsum("bhgd,ehd->bhge", qg, wk.reshape(-1, H, D), preferred_element_type=jnp.float32)
        bias_BxHxG = jnp.einsum("bhgd,hd->bhg", qg, bk.reshape(H, D), preferred_element_type=jnp.float32)
        s = jnp.einsum("bhge,ble->bhgl", qk_BxHxGxE.astype(x.dtype), x, preferred_element_type=jnp.float32)
        return s + bias_BxHxG[..., None]
    k_BxHxLxD = (x @ wk + bk).reshape(B, x.shape[1], H, D).transpose(0, 2, 1, 3)
    return jnp.einsum("bhgd,bhld->bhgl", qg, k_BxHxLxD, preferred_element_type=jnp.float32)


def _global_values(p_BxHxGxL, x, value_global, reassociate: bool) -> Array:
    """Sum over the whole sequence of ``p`` times the global values, (B, H, G, D) float32 (a psum)."""
    B, H, G, _ = p_BxHxGxL.shape
    wv, bv = (a.astype(x.dtype) for a in value_global)
    D = wv.shape[1] // H
    p = p_BxHxGxL.astype(x.dtype)
    if reassociate:
        ph_BxHxGxE = jnp.einsum("bhgl,ble->bhge", p, x, preferred_element_type=jnp.float32)
        ph_BxHxGxE, mass_BxHxG = jax.lax.psum((ph_BxHxGxE, jnp.sum(p_BxHxGxL, axis=-1)), SEQUENCE_AXIS)
        out = jnp.einsum(
            "bhge,ehd->bhgd", ph_BxHxGxE.astype(x.dtype), wv.reshape(-1, H, D), preferred_element_type=jnp.float32
        )
        return out + mass_BxHxG[..., None] * value_global[1].astype(jnp.float32).reshape(H, D)[None, :, None, :]
    v_BxHxLxD = (x @ wv + bv).reshape(B, x.shape[1], H, D).transpose(0, 2, 1, 3)
    return jax.lax.psum(jnp.einsum("bhgl,bhld->bhgd", p, v_BxHxLxD, preferred_element_type=jnp.float32), SEQUENCE_AXIS)


def _global_rows(
    qg, x, key_global, value_global, mask_BxL, slots: GlobalSlots, *, causal, reassociate, dropout_rate, dropout_rng
):
    """The global queries' outputs (B, H, G, D) over every non-pad key of the whole sequence (when ``causal``,
    the keys ``j <= i``).

    One softmax over the pieces: the row maximum (``pmax``), then the denominators and the weighted
    sums of the values (``psum``); the same operations as ``jax.nn.softmax`` on one device."""
    s = _global_scores(qg, x, key_global, reassociate)
    keep = slots.valid_BxG[:, None, :, None] & (mask_BxL != 0)[:, None, None, :]
    if causal:
        pos_1x1x1xL = (jax.lax.axis_index(SEQUENCE_AXIS) * x.shape[1] + jnp.arange(x.shape[1]))[None, None, None, :]
        keep = keep & (pos_1x1x1xL <= slots.index_BxG[:, None, :, None])
    s = jnp.where(keep, s, _MASKED)
    # The softmax does not depend on the shift: no gradient through the maximum.
    m = jax.lax.stop_gradient(jax.lax.pmax(jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)), SEQUENCE_AXIS))
    e = jnp.exp(s - m)
    p = e / jax.lax.psum(jnp.sum(e, axis=-1, keepdims=True), SEQUENCE_AXIS)
    out = _global_values(dropout(dropout_rng, dropout_rate, p), x, value_global, reassociate)
    return out.astype(x.dtype)


def _local_attention(
    q,
    k,
    v,
    mask_BxL,
    slots,
    glob,
    rngs,
    *,
    w,
    devices,
    device_axes,
    dilation,
    causal,
    block_size,
    dropout_rate,
    reassociate,
):
    """One device's rows of the self-attention (B, H, L/n, D): band, global columns and global rows."""
    index_BxG, own_BxG = _owned(slots, q.shape[2])
    rng_band, rng_global = (None if r is None else jax.random.fold_in(r, jax.lax.axis_index(device_axes)) for r in rngs)
    global_kv = None
    if glob is not None:
        global_kv = (
            _gather_owned(k, index_BxG, own_BxG, axis=2),
            _gather_owned(v, index_BxG, own_BxG, axis=2),
            (slots.index_BxG, slots.valid_BxG),
        )
    out = _band(
        q,
        k,
        v,
        mask_BxL,
        w,
        devices,
        global_kv,
        dilation=dilation,
        causal=causal,
        block_size=block_size,
        dropout_rate=dropout_rate,
        dropout_rng=rng_band,
    )
    if glob is None:
        return out
    rows = _global_rows(
        *glob,
        mask_BxL,
        slots,
        causal=causal,
        reassociate=reassociate,
        dropout_rate=dropout_rate,
        dropout_rng=rng_global,
    )
    return attn.scatter_global_rows_heads(out, rows, GlobalSlots(index_BxG, own_BxG, slots.overflow_B))


# ------------------------------------------------------------------------------ the entry points
# The shard_maps run with check_vma=False: the band's custom VJP (attention._lean_band) accumulates its
# gradients in scans that start from zeros, which the varying-value check would reject. Without the
# check a psum transposes to a psum, which is what every psum here needs: each device's cotangent is
# its own part of the whole (the gradients equal one device's: tests/test_sequence_parallel.py).


def _row_axes(batch: int) -> tuple[str, ...] | None:
    """The mesh axes the rows of a batch are split over inside the shard_map (None: not split)."""
    return batch_shard_axes(batch) or None


def _slot_specs(rows) -> GlobalSlots:
    return GlobalSlots(P(rows, None), P(rows, None), P(rows))


def take_global_rows(x_BxLxE: Array, slots: GlobalSlots) -> Array:
    """The rows of the global tokens (B, G, E) of a (B, L, E) array split over the "sequence" axis."""
    B, _, E = x_BxLxE.shape
    if slots.index_BxG.shape[1] == 0:
        return jnp.zeros((B, 0, E), x_BxLxE.dtype)
    rows = _row_axes(B)

    def local(x, slots):
        index_BxG, own_BxG = _owned(slots, x.shape[1])
        return _gather_owned(x, index_BxG, own_BxG, axis=1)

    specs = (P(rows, SEQUENCE_AXIS, None), _slot_specs(rows))
    return jax.shard_map(local, in_specs=specs, out_specs=P(rows, None, None), check_vma=False)(x_BxLxE, slots)


def self_attention_heads(
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    slots: GlobalSlots,
    qg_BxHxGxD: Array,
    x_BxLxE: Array,
    key_global: tuple[Array, Array],
    value_global: tuple[Array, Array],
    *,
    implementation: str = "blocked",
    block_size: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    global_dropout_rng: Array | None = None,
    dilation: int | Sequence[int] = 1,
    causal: bool = False,
) -> Array:
    """A layer's self-attention (B, H, L, D), its tokens split over the ambient mesh's "sequence" axis.

    What ``LongformerSelfAttention`` computes on one device (the band with its global columns, the
    global queries' rows written over it), with the arrays laid out over the mesh: ``q``, ``k``,
    ``v`` (local projections, ``q`` scaled) and ``mask_BxL`` (0 pad, 1 local, 2 global) split along
    the tokens; ``slots`` (over the whole sequence), ``qg_BxHxGxD`` (the scaled global queries,
    :func:`take_global_rows`) and the global projections' ``(kernel, bias)`` whole. ``x_BxLxE``: the
    layer's input in the compute dtype (the global keys and values are its projections). Dropout:
    ``dropout_rng`` for the band, ``global_dropout_rng`` for the global rows (see the module).
    ``dilation`` (an int, or one per head) and ``causal``: the layer's pattern, as in
    ``attention.lean_band_attention_heads``."""
    B, H, L, _ = q_BxHxLxD.shape
    w, devices = one_sided_window, sequence_devices()
    check_sequence_split(L, 2 * w, devices, implementation, dilation)
    G = slots.index_BxG.shape[1]
    rows = _row_axes(B)
    rate = float(dropout_rate) if dropout_rng is not None else 0.0
    local = functools.partial(
        _local_attention,
        w=w,
        devices=devices,
        device_axes=(*(rows or ()), SEQUENCE_AXIS),
        dilation=dilation,
        causal=causal,
        block_size=block_size,
        dropout_rate=rate,
        reassociate=bool(G) and attn.reassociate_global(G, H, x_BxLxE.shape[-1]),
    )
    heads = P(rows, None, SEQUENCE_AXIS, None)
    glob = (qg_BxHxGxD, x_BxLxE, key_global, value_global) if G else None
    glob_specs = (P(rows, None, None, None), P(rows, SEQUENCE_AXIS, None), (P(), P()), (P(), P())) if G else None
    rngs = (dropout_rng if rate else None, global_dropout_rng if rate and G else None)
    rng_specs = tuple(None if r is None else P() for r in rngs)
    specs = (heads, heads, heads, P(rows, SEQUENCE_AXIS), _slot_specs(rows), glob_specs, rng_specs)
    return jax.shard_map(local, in_specs=specs, out_specs=heads, check_vma=False)(
        q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_BxL, slots, glob, rngs
    )


__all__ = [
    "IMPLEMENTATIONS",
    "check_sequence_split",
    "halo_rows",
    "self_attention_heads",
    "sequence_devices",
    "take_global_rows",
]
