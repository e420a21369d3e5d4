"""Dropout masks from XLA's counter-based Threefry generator.

``jax.random.bernoulli`` builds its bits with JAX's own Threefry (one 32-bit word out of each
2x32 block) and then turns them into floats; on a CPU that costs about four times what XLA's
``RngBitGenerator`` with the same Threefry-2x32 algorithm needs, and dropout on the attention
probabilities draws ``heads x length x (2w + 1)`` numbers per layer. Here a mask is drawn in one
``RngBitGenerator`` call keyed by 128 bits taken from the JAX key, and a value is kept when its
32-bit word is below ``round((1 - rate) * 2**32)`` (the keep probability is exact to 2**-32).

The masks are a pure function of the key and the shape (the generator is counter-based):
``tests/test_train_multidevice.py`` checks that a training run with dropout gives the same numbers
on one device and on a 2x4 mesh, and under ``vmap`` every key draws the mask it draws alone. The
stream differs from ``jax.random.bernoulli``'s; nothing else does.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _threshold(rate: float) -> np.uint32:
    return np.uint32(min(round((1.0 - rate) * 2.0**32), 2**32 - 1))


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {rate}.")


def keep_mask(rng: Array, rate: float, shape: Sequence[int]) -> Array:
    """Boolean mask of ``shape``: True with probability ``1 - rate``, independently per entry."""
    _check_rate(rate)
    shape = tuple(int(s) for s in shape)
    if rate == 0.0:
        return jnp.ones(shape, bool)
    if rate == 1.0:
        return jnp.zeros(shape, bool)
    return _bits(jax.random.bits(rng, (4,), jnp.uint32), shape) < _threshold(rate)


def _bits(key_4: Array, shape: tuple[int, ...]) -> Array:
    """uint32 words of ``shape`` from a 128-bit key; under ``vmap`` each key draws its own words.

    (``rng_bit_generator``'s own batching rule would draw every row from the first key.)"""

    @jax.custom_batching.custom_vmap
    def draw(key):
        algorithm = jax.lax.RandomAlgorithm.RNG_THREE_FRY
        return jax.lax.rng_bit_generator(key, shape, dtype=jnp.uint32, algorithm=algorithm)[1]

    @draw.def_vmap
    def _draw_batched(axis_size, in_batched, key):
        if not in_batched[0]:
            return draw(key), False
        return jax.lax.map(draw, key), True

    return draw(key_4)


def apply_mask(keep: Array, rate: float, x: Array) -> Array:
    """``x / (1 - rate)`` where ``keep``, else 0 (a rate of 1 gives zeros)."""
    if rate >= 1.0:
        return jnp.zeros_like(x)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def dropout(rng: Array | None, rate: float, x: Array) -> Array:
    """Inverted dropout of ``x`` (nothing happens when ``rng`` is None or ``rate`` is 0)."""
    if rng is None or rate == 0.0:
        return x
    return apply_mask(keep_mask(rng, rate, x.shape), rate, x)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` with the masks of :func:`keep_mask` (same arguments, same ``dropout`` rng)."""

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        return dropout(self.make_rng(self.rng_collection), self.rate, x)
