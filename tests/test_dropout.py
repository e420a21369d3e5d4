"""Dropout masks (longformer_jax.dropout): rate, determinism, edge cases, transformations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longformer_jax.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_matches_the_rate(rate):
    n = 1_000_000
    keep = np.asarray(keep_mask(jax.random.PRNGKey(0), rate, (n,)))
    # binomial standard deviation of the kept fraction; 6 of them is far beyond chance
    assert abs(keep.mean() - (1 - rate)) <= 6 * np.sqrt(rate * (1 - rate) / n)


def test_masks_are_a_function_of_the_key_and_independent_across_keys():
    a = np.asarray(keep_mask(jax.random.PRNGKey(1), 0.5, (64, 256)))
    b = np.asarray(keep_mask(jax.random.PRNGKey(1), 0.5, (64, 256)))
    c = np.asarray(keep_mask(jax.random.PRNGKey(2), 0.5, (64, 256)))
    assert np.array_equal(a, b)
    # two independent fair masks agree on about half the entries
    assert abs((a == c).mean() - 0.5) < 0.02
    # no row repeats (the counter covers every entry)
    assert len({r.tobytes() for r in a}) == a.shape[0]


def test_typed_keys_and_vmap_over_keys():
    keys = jax.random.split(jax.random.key(3), 4)
    mapped = jax.vmap(lambda k: keep_mask(k, 0.3, (10, 100)))(keys)
    direct = jnp.stack([keep_mask(k, 0.3, (10, 100)) for k in keys])
    assert np.array_equal(np.asarray(mapped), np.asarray(direct))


def test_inverted_scaling_and_gradient():
    x = jnp.ones((1000,))
    rng = jax.random.PRNGKey(4)
    y = np.asarray(dropout(rng, 0.25, x))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    g = np.asarray(jax.grad(lambda x: dropout(rng, 0.25, x).sum())(x))
    assert np.array_equal(g, y)  # d/dx of the masked, scaled x is the mask times the scale


def test_edge_rates_and_bad_rate():
    x = jnp.arange(6.0)
    rng = jax.random.PRNGKey(5)
    assert np.array_equal(np.asarray(dropout(rng, 0.0, x)), np.asarray(x))
    assert np.array_equal(np.asarray(dropout(None, 0.5, x)), np.asarray(x))
    assert not np.asarray(dropout(rng, 1.0, x)).any()
    with pytest.raises(ValueError, match="dropout rate must be in"):
        keep_mask(rng, 1.5, (3,))


def test_flax_module_uses_the_dropout_rng_only_when_not_deterministic():
    m = Dropout(0.5)
    x = jnp.ones((4, 32))
    assert np.array_equal(np.asarray(m.apply({}, x, deterministic=True)), np.asarray(x))
    a = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    b = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_vmap_and_grad_compose():
    keys = jax.random.split(jax.random.PRNGKey(6), 3)
    x = jnp.ones((3, 64))
    f = lambda k, x: (dropout(k, 0.5, x) ** 2).sum()
    a = jax.vmap(jax.grad(f, argnums=1))(keys, x)
    b = jax.grad(lambda x: jax.vmap(f)(keys, x).sum())(x)
    c = jnp.stack([jax.grad(f, argnums=1)(k, x[i]) for i, k in enumerate(keys)])
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))
    assert set(np.unique(np.asarray(a))) == {0.0, 8.0}  # d/dx (2x)^2 = 8 where kept
