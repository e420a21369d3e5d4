"""The band plus global columns through TPU splash attention (``jax.experimental.pallas.ops.tpu``).

Splash attention takes a static mask (shared by the batch) and segment ids (per sequence). The
Longformer's pattern is expressed as:

- key/value rows = the ``G`` global keys (LOCAL projections, gathered by slot) as a prefix, padded to
  a multiple of the key block ``P``, followed by the sequence;
- static mask = ``LocalMask`` (``|i - j| <= w`` on the sequence part, shifted by ``P``) ``|`` a prefix mask
  (every query sees the ``P`` prefix rows); splash visits only the key blocks this mask touches;
- segment ids mask what depends on the data: a query of a non-pad token has segment 0 and sees only
  keys of segment 0 (local tokens of the band and filled global slots); pad and global tokens inside
  the band, empty slots and the prefix's padding have segment 1. A pad query has segment 1 and sees
  segment-1 keys (its own key among them, so no row is empty); its output is then set to zero.

One softmax covers the prefix and the band, so splash's own backward kernels (dQ, dK/dV from the
float32 log-sum-exp of the whole row) give exact gradients; the prefix's gradients flow back to the
gathered rows of ``k`` and ``v``. The blocked path gives a masked key float32's min instead of removing
it: both give it exactly zero probability whenever the row has any unmasked key, which every row of a
model has (a local query sees itself, a global query its own slot).

Splash's key blocks are multiples of 128 (TPU lanes), also in interpret mode: the sequence is padded
to a multiple of the block with pad tokens. Splash attention has no dropout: the dispatcher refuses
``attention_implementation="splash"`` with attention dropout on.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from longformer_jax.attention import GlobalSlots
from longformer_jax.kernels import common

Array = jax.Array

# Query and key rows per splash block (TPU: a multiple of 128 lanes).
BLOCK = 128


@dataclasses.dataclass(frozen=True)
class PrefixMask(sa.Mask):
    """Every query sees the first ``prefix`` key rows (a lazy mask: nothing L x L is built)."""

    mask_shape: tuple[int, int]
    prefix: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.mask_shape

    def __getitem__(self, idx) -> np.ndarray:
        rows, cols = idx
        rows = range(*rows.indices(self.mask_shape[0]))
        cols = np.arange(*cols.indices(self.mask_shape[1]))
        return np.broadcast_to(cols[None, :] < self.prefix, (len(rows), len(cols)))


def band_mask(length: int, prefix: int, w: int) -> sa.Mask:
    """The static mask over (queries, prefix + sequence keys): the band, or the prefix."""
    shape = (length, prefix + length)
    band = sa.LocalMask(shape, window_size=(w, w), offset=prefix)
    return band | PrefixMask(shape, prefix) if prefix else band


@functools.lru_cache(maxsize=64)
def _mask(length: int, prefix: int, w: int, heads: int) -> sa.MultiHeadMask:
    return sa.MultiHeadMask([band_mask(length, prefix, w)] * heads)


def _kernel(length: int, prefix: int, w: int, heads: int, block: int, interpret: bool):
    """Splash's kernel for the band, made where it is called.

    Its mask tables are NumPy work (splash caches them per mask and block shape); they enter the
    program as constants of the trace that calls the kernel. Nothing runs on a device when the kernel
    is made, so it compiles for devices this host does not have (an accelerator target's topology),
    and nothing traced is kept between traces (``nn.scan`` over the layers traces the layer apart)."""
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = _mask(length, prefix, w, heads)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def band_attention(
    q_BxHxLxD: Array,
    k_BxHxLxD: Array,
    v_BxHxLxD: Array,
    mask_BxL: Array,
    one_sided_window: int,
    slots: GlobalSlots | None = None,
    *,
    block: int = BLOCK,
    interpret: bool = False,
) -> Array:
    """``attention.lean_band_attention_heads`` (without dropout) through splash attention, vmapped over the batch.

    ``q`` is already scaled (splash applies no scale). ``block``: query and key rows per splash block
    (a multiple of 128); the sequence is padded to a multiple of it."""
    if block % 128:
        raise ValueError(f"splash band attention: block={block} must be a multiple of 128 (TPU lanes).")
    B, H, L, D = q_BxHxLxD.shape
    w = one_sided_window
    Lp = common.round_up(L, block)
    q, k, v = (common.pad_to(x, 2, Lp) for x in (q_BxHxLxD, k_BxHxLxD, v_BxHxLxD))
    mask = common.pad_to(mask_BxL.astype(jnp.int32), 1, Lp)
    seg_q = jnp.where(mask == 0, 1, 0).astype(jnp.int32)
    seg_kv = jnp.where(mask == 1, 0, 1).astype(jnp.int32)
    G = common.num_slots(slots)
    P = common.round_up(G, block) if G else 0
    if G:
        kg, vg = common.global_prefix(k, v, slots)
        k = jnp.concatenate([common.pad_to(kg, 2, P), k], axis=2)
        v = jnp.concatenate([common.pad_to(vg, 2, P), v], axis=2)
        seg_g = common.pad_to(jnp.where(slots.valid_BxG, 0, 1).astype(jnp.int32), 1, P, 1)
        seg_kv = jnp.concatenate([seg_g, seg_kv], axis=1)
    kernel = _kernel(Lp, P, w, H, block, bool(interpret))

    def one(q, k, v, seg_q, seg_kv):
        return kernel(q, k, v, segment_ids=sa.SegmentIds(q=seg_q, kv=seg_kv))

    o = jax.vmap(one)(q, k, v, seg_q, seg_kv)[:, :, :L]
    return jnp.where((mask_BxL == 0)[:, None, :, None], 0.0, o).astype(v_BxHxLxD.dtype)
