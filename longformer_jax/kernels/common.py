"""What the attention kernels share: the masked-score constant, padding, the global prefix, kernel dropout.

Every kernel computes the function of ``attention.lean_band_attention_heads`` (see its module
docstring): a local query ``i`` sees the band keys ``{j : |i-j| <= w, j local}`` plus the ``G`` global
keys as extra columns, one float32 softmax over both. This module is the one home of

- ``MASKED``: the score of a pad or global key inside the band and of an empty global slot (float32's
  min, as HF and the blocked path fill them: such a key gets exactly zero probability unless every
  key of the row is masked, and then the row is uniform, as in HF);
- the padding of a sequence or head dimension up to what a kernel's tiles need (pads are pad tokens);
- the global prefix: the keys and values of the global slots, gathered from the LOCAL projections;
- the dropout of the kernels: a counter-based hash of ``(stream of (batch, head), query row, HF column)``
  that the forward and backward kernels recompute in their tiles, so no mask is ever stored. The
  column is HF's layout of the local probabilities (``G`` global columns, then the ``2w + 1`` band
  columns with the query itself at ``G + w``), so a dense reference can draw the same mask
  (:func:`keep_mask_hf`). Its stream differs from the blocked path's (``longformer_jax.dropout``);
  only the keep probability (exact to 2**-32) is the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax.attention import GlobalSlots

Array = jax.Array

MASKED = float(np.finfo(np.float32).min)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pad_to(x: Array, axis: int, size: int, value=0) -> Array:
    """``x`` padded at the end of ``axis`` up to ``size`` entries (unchanged when already that long)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def num_slots(slots: GlobalSlots | None) -> int:
    return 0 if slots is None else int(slots.index_BxG.shape[1])


def global_prefix(k_BxHxLxD: Array, v_BxHxLxD: Array, slots: GlobalSlots) -> tuple[Array, Array]:
    """The keys and values of the global slots (local projections), (B, H, G, D) each."""
    index = slots.index_BxG[:, None, :, None]
    return jnp.take_along_axis(k_BxHxLxD, index, axis=2), jnp.take_along_axis(v_BxHxLxD, index, axis=2)


# ------------------------------------------------------------------------------------- dropout
# 32-bit words are held in int32 (two's complement: products wrap as in uint32) because Triton's
# constants and comparisons are signed; an unsigned comparison flips the top bit of both sides.
_TOP = np.int32(-(2**31))


def _threshold(rate: float) -> np.int32:
    """Keep a word below this (unsigned, top bit flipped): the keep probability is exact to 2**-32."""
    t = min(round((1.0 - rate) * 2.0**32), 2**32 - 1)
    return np.int32(t - 2**31)


def dropout_scale(rate: float) -> float:
    return 0.0 if rate >= 1.0 else 1.0 / (1.0 - rate)


def _i32(u: int) -> np.int32:
    return np.int32(u - 2**32 if u >= 2**31 else u)


def _fmix32(x: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    x = x ^ jax.lax.shift_right_logical(x, np.int32(16))
    x = x * _i32(0x85EBCA6B)
    x = x ^ jax.lax.shift_right_logical(x, np.int32(13))
    x = x * _i32(0xC2B2AE35)
    return x ^ jax.lax.shift_right_logical(x, np.int32(16))


def dropout_streams(rng: Array, batch: int, heads: int) -> Array:
    """One 32-bit stream id per (batch row, head), (B, H) int32, from a JAX key."""
    key_2 = jax.lax.bitcast_convert_type(jax.random.bits(rng, (2,), jnp.uint32), jnp.int32)
    bh = jnp.arange(batch * heads, dtype=jnp.int32).reshape(batch, heads)
    return _fmix32(_fmix32(bh ^ key_2[0]) + key_2[1])


def keep(stream: Array, rows: Array, cols: Array, width: int, rate: float) -> Array:
    """Whether the probability at (query row, HF column) of a stream is kept, elementwise (broadcasts).

    ``width`` is the number of HF columns ``G + 2w + 1``. Plain int32 arithmetic, so the same function
    runs inside a Pallas kernel (Triton or interpret mode) and in plain JAX."""
    counter = rows * width + cols
    x = _fmix32(_fmix32(counter ^ stream) + stream * _i32(0x9E3779B9))
    return (x ^ _TOP) < _threshold(rate)


def keep_mask_hf(rng: Array, rate: float, batch: int, heads: int, length: int, num_global: int, w: int) -> Array:
    """The kernels' dropout mask in HF's layout, (B, H, L, G + 2w + 1) bool: for tests and references."""
    width = num_global + 2 * w + 1
    streams = dropout_streams(rng, batch, heads)[:, :, None, None]
    rows = jnp.arange(length, dtype=jnp.int32)[:, None]
    cols = jnp.arange(width, dtype=jnp.int32)[None, :]
    return keep(streams, rows, cols, width, rate)
