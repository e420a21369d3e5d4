"""The blocked sliding-window + global attention equals the dense O(L^2) reference, in linear memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longformer_jax import attention as A

H, D = 2, 4


# The attention functions work head-major (B, H, L, D); the tests and the dense reference use (B, L, H, D).
def heads(x):
    return jnp.swapaxes(x, 1, 2)


def sliding_window_attention(q, k, v, mask, w, slots=None, **kw):
    """``A.sliding_window_attention_heads`` on (B, L, H, D) arrays: output (B, L, H, D) and HF-layout probs."""
    out, probs = A.sliding_window_attention_heads(heads(q), heads(k), heads(v), mask, w, slots, **kw)
    return heads(out), probs


def global_query_attention(qg, k, v, mask, slots, **kw):
    """``A.global_query_attention_heads`` on (B, G|L, H, D) arrays: output (B, G, H, D), probs (B, H, G, L)."""
    out, probs = A.global_query_attention_heads(heads(qg), heads(k), heads(v), mask, slots, **kw)
    return heads(out), probs


def scatter_global_rows(out, rows, slots):
    """``A.scatter_global_rows_heads`` on (B, L|G, H, D) arrays."""
    return heads(A.scatter_global_rows_heads(heads(out), heads(rows), slots))


def random_case(seed, B, L, w, n_global, pad_frac=0.2):
    rng = np.random.default_rng(seed)
    q, k, v, qg, kg, vg = (jnp.asarray(rng.normal(size=(B, L, H, D)), jnp.float32) for _ in range(6))
    mask = np.ones((B, L), np.int32)
    for b in range(B):
        pads = rng.random(L) < pad_frac
        pads[rng.integers(0, L)] = False
        mask[b, pads] = 0
        glob = rng.choice(L, size=min(n_global[b], L), replace=False)
        mask[b, glob] = np.where(mask[b, glob] == 1, 2, mask[b, glob])
    return q, k, v, qg, kg, vg, jnp.asarray(mask)


def blocked(q, k, v, qg_full, kg, vg, mask, w, num_slots, block_size=None, return_probs=True):
    slots = A.global_slots(mask == 2, num_slots)
    out, probs = sliding_window_attention(q, k, v, mask, w, slots, block_size=block_size, return_probs=return_probs)
    qg = jnp.take_along_axis(qg_full, slots.index_BxG[:, :, None, None], axis=1)
    out_g, gprobs = global_query_attention(qg, kg, vg, mask, slots)
    return scatter_global_rows(out, out_g, slots), probs, gprobs, slots


@pytest.mark.parametrize(
    "B,L,w,block,n_global",
    [
        (2, 32, 4, None, (3, 0)),
        (1, 48, 6, 3, (5,)),
        (3, 64, 8, 2, (0, 1, 7)),
        (2, 16, 8, None, (16, 2)),  # window wider than half the sequence; a row that is all global
        (1, 40, 10, 5, (0,)),
    ],
)
@pytest.mark.slow
def test_blocked_equals_dense(B, L, w, block, n_global):
    q, k, v, qg, kg, vg, mask = random_case(B * L + w, B, L, w, n_global)
    num_slots = max(max(n_global), 1) + 1  # spare slots must change nothing
    out, probs, gprobs, slots = blocked(q, k, v, qg, kg, vg, mask, w, num_slots, block)
    ref_out, ref_p = A.dense_attention(q, k, v, qg, kg, vg, mask, w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5)

    # The probabilities in HF's layout: G global columns, then the band (column w = the query itself).
    ref_p = np.asarray(ref_p)
    probs = np.asarray(probs)
    mask_np = np.asarray(mask)
    G = num_slots
    for b in range(B):
        idx = np.asarray(slots.index_BxG[b])
        valid = np.asarray(slots.valid_BxG[b])
        for i in range(L):
            if mask_np[b, i] == 2:
                continue  # a global query's local row is replaced by its global one
            for g in range(G):
                want = ref_p[b, :, i, idx[g]] if valid[g] else 0.0
                np.testing.assert_allclose(probs[b, :, i, g], want, atol=1e-6)
            for c in range(2 * w + 1):
                j = i - w + c
                inside = 0 <= j < L and mask_np[b, j] == 1
                want = ref_p[b, :, i, j] if inside else 0.0
                np.testing.assert_allclose(probs[b, :, i, G + c], want, atol=1e-6)
        # global rows: the global probabilities over every key
        for g in range(G):
            if valid[g]:
                np.testing.assert_allclose(np.asarray(gprobs[b, :, g]), ref_p[b, :, idx[g]], atol=1e-6)


def test_pad_rows_are_zero_and_probabilities_sum_to_one():
    q, k, v, qg, kg, vg, mask = random_case(0, 2, 32, 4, (2, 0), pad_frac=0.3)
    out, probs, _, _ = blocked(q, k, v, qg, kg, vg, mask, 4, 2)
    m = np.asarray(mask)
    assert np.all(np.asarray(out)[m == 0] == 0)
    sums = np.asarray(probs).sum(-1)  # (B, H, L)
    local = np.broadcast_to((m == 1)[:, None, :], sums.shape)
    np.testing.assert_allclose(sums[local], 1.0, atol=1e-5)


def test_global_slots_in_order_with_overflow():
    g = jnp.asarray([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], bool)
    s = A.global_slots(g, 3)
    assert np.asarray(s.index_BxG).tolist() == [[1, 3, 4], [0, 0, 0], [0, 1, 2]]
    assert np.asarray(s.valid_BxG).tolist() == [[True] * 3, [False] * 3, [True] * 3]
    assert np.asarray(s.overflow_B).tolist() == [False, False, True]
    s0 = A.global_slots(g, 0)
    assert s0.index_BxG.shape == (3, 0) and np.asarray(s0.overflow_B).tolist() == [True, False, True]


@pytest.mark.slow
def test_gradients_match_dense():
    q, k, v, qg, kg, vg, mask = random_case(3, 2, 24, 3, (2, 1))

    def f_blocked(q, k, v, qg, kg, vg):
        return jnp.sum(jnp.sin(blocked(q, k, v, qg, kg, vg, mask, 3, 2, return_probs=False)[0]))

    def f_dense(q, k, v, qg, kg, vg):
        return jnp.sum(jnp.sin(A.dense_attention(q, k, v, qg, kg, vg, mask, 3)[0]))

    ga = jax.grad(f_blocked, argnums=range(6))(q, k, v, qg, kg, vg)
    gb = jax.grad(f_dense, argnums=range(6))(q, k, v, qg, kg, vg)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
def test_vmap_over_examples_equals_batch():
    q, k, v, qg, kg, vg, mask = random_case(4, 3, 16, 4, (1, 2, 0))
    slots = A.global_slots(mask == 2, 2)
    full, _ = sliding_window_attention(q, k, v, mask, 4, slots)

    def one(q, k, v, m, idx, valid, over):
        s = A.GlobalSlots(idx[None], valid[None], over[None])
        return sliding_window_attention(q[None], k[None], v[None], m[None], 4, s)[0][0]

    mapped = jax.vmap(one)(q, k, v, mask, *slots)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(full), atol=1e-6)


@pytest.mark.slow
def test_dropout_on_probabilities():
    q, k, v, qg, kg, vg, mask = random_case(5, 1, 32, 4, (2,))
    slots = A.global_slots(mask == 2, 2)
    ref, _ = sliding_window_attention(q, k, v, mask, 4, slots)
    same, _ = sliding_window_attention(q, k, v, mask, 4, slots, dropout_rate=0.0, dropout_rng=jax.random.PRNGKey(0))
    dropped, _ = sliding_window_attention(q, k, v, mask, 4, slots, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0))
    assert np.array_equal(np.asarray(ref), np.asarray(same))
    assert not np.allclose(np.asarray(ref), np.asarray(dropped))
    # the expectation is kept: over many masks the mean output is the undropped one, within 5 standard errors
    drop = jax.jit(lambda r: sliding_window_attention(q, k, v, mask, 4, slots, dropout_rate=0.5, dropout_rng=r)[0])
    outs = np.stack([np.asarray(drop(jax.random.PRNGKey(i))) for i in range(400)])
    stderr = outs.std(0) / np.sqrt(len(outs))
    assert np.all(np.abs(outs.mean(0) - np.asarray(ref)) <= 5 * stderr + 1e-6)


def test_bad_lengths_are_clear_errors():
    q = jnp.zeros((1, 30, H, D))
    with pytest.raises(ValueError, match="sequence length 30 must be a multiple of the window 2w=8"):
        sliding_window_attention(q, q, q, jnp.ones((1, 30), jnp.int32), 4)


def _temp_bytes(L, w=64, G=4):
    B, Hh, Dd = 1, 4, 16
    x = jax.ShapeDtypeStruct((B, L, Hh, Dd), jnp.float32)
    m = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def f(q, k, v, mask):
        slots = A.global_slots(mask == 2, G)
        out, _ = sliding_window_attention(q, k, v, mask, w, slots)
        qg = jnp.take_along_axis(q, slots.index_BxG[:, :, None, None], axis=1)
        og, _ = global_query_attention(qg, k, v, mask, slots)
        return scatter_global_rows(out, og, slots)

    compiled = jax.jit(f).lower(x, x, x, m).compile()
    mem = compiled.memory_analysis()
    return mem.temp_size_in_bytes


def test_memory_grows_linearly_with_length():
    """The compiled attention holds no L x L buffer: temp memory at 2L is about twice that at L."""
    a, b, c = _temp_bytes(4096), _temp_bytes(8192), _temp_bytes(16384)
    assert 1.6 < b / a < 2.4, (a, b)
    assert 1.6 < c / b < 2.4, (b, c)
    # a single L x L float32 score matrix at 16384 would be 1 GiB (and 4 GiB for the 4 heads)
    assert c < 16384 * 16384 * 4 / 4


@pytest.mark.parametrize(
    "B,L,w,block,n_global,slots,chunk",
    [
        (2, 32, 4, None, (3, 0), 4, 8),  # several chunks
        (1, 48, 6, 3, (5,), 6, 9),  # a chunk size that does not divide the blocks
        (3, 64, 8, 2, (0, 1, 7), 8, 16),
        (2, 64, 8, 4, (2, 1), 2, 1000),  # one chunk; band width C + 2w divisible by 8
        (1, 40, 10, 5, (0,), 0, 10),  # no global slots at all
    ],
)
@pytest.mark.slow
def test_lean_band_equals_materialised_band(B, L, w, block, n_global, slots, chunk):
    """The memory-lean path (chunks, recomputing backward) gives the same outputs and gradients."""
    q, k, v, _, _, _, mask = random_case(B * L + w, B, L, w, n_global)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # head-major (B, H, L, D)
    sl = A.global_slots(mask == 2, slots)

    def ref(q, k, v):
        return A.sliding_window_attention_heads(q, k, v, mask, w, sl, block_size=block)[0]

    def lean(q, k, v):
        return A.lean_band_attention_heads(q, k, v, mask, w, sl, block_size=block, chunk_tokens=chunk)

    np.testing.assert_allclose(np.asarray(jax.jit(lean)(q, k, v)), np.asarray(ref(q, k, v)), atol=1e-5)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    g_lean = jax.jit(jax.grad(lambda *a: jnp.sum(lean(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_lean, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
def test_lean_band_dropout_gradient_matches_autodiff():
    """With dropout, the custom backward equals autodiff of the same forward (same masks)."""
    q, k, v, _, _, _, mask = random_case(5, 1, 32, 4, (2,))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    sl = A.global_slots(mask == 2, 2)
    rng = jax.random.PRNGKey(3)

    def lean(q, k, v):
        return A.lean_band_attention_heads(q, k, v, mask, 4, sl, dropout_rate=0.3, dropout_rng=rng, chunk_tokens=8)

    band = A._Band(4, 4, A._chunk_blocks(8, 4, 8), 0.3, jnp.float32)

    def plain(q, k, v):
        kg = jnp.take_along_axis(k, sl.index_BxG[:, None, :, None], axis=2)
        vg = jnp.take_along_axis(v, sl.index_BxG[:, None, :, None], axis=2)
        return A._band_forward(band, q, k, v, kg, vg, sl.valid_BxG, mask, rng)[0]

    no_drop = A.lean_band_attention_heads(q, k, v, mask, 4, sl, chunk_tokens=8)
    assert not np.allclose(np.asarray(lean(q, k, v)), np.asarray(no_drop))
    np.testing.assert_allclose(np.asarray(lean(q, k, v)), np.asarray(plain(q, k, v)), atol=1e-6)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    g1 = jax.grad(lambda *a: jnp.sum(lean(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(lambda *a: jnp.sum(plain(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.4])
def test_global_projections_folded_into_the_queries(rate):
    """Folding key_global/value_global into the global queries gives the projected path's numbers."""
    rng = np.random.default_rng(7)
    B, L, H, D = 2, 24, 3, 4
    E = H * D
    h = jnp.asarray(rng.normal(size=(B, L, E)), jnp.float32)
    wk, wv = (jnp.asarray(rng.normal(size=(E, E)) / np.sqrt(E), jnp.float32) for _ in range(2))
    bk, bv = (jnp.asarray(rng.normal(size=(E,)), jnp.float32) for _ in range(2))
    mask = np.ones((B, L), np.int32)
    mask[1, 20:] = 0
    mask[0, [0, 5, 17]] = 2
    mask[1, [3]] = 2
    mask = jnp.asarray(mask)
    slots = A.global_slots(mask == 2, 4)
    qg = jnp.asarray(rng.normal(size=(B, H, 4, D)), jnp.float32)
    heads = lambda x: x.reshape(B, L, H, D).transpose(0, 2, 1, 3)
    kw = dict(dropout_rate=rate, dropout_rng=jax.random.PRNGKey(2) if rate else None)
    ref_out, ref_p = A.global_query_attention_heads(qg, heads(h @ wk + bk), heads(h @ wv + bv), mask, slots, **kw)
    out, p = A.global_query_attention_from_hidden_heads(qg, h, wk, bk, wv, bv, mask, slots, **kw)
    valid = np.asarray(slots.valid_BxG)[:, None, :, None]
    np.testing.assert_allclose(np.asarray(p), np.asarray(ref_p), atol=1e-6)
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref_out, 0), atol=1e-5)
    assert A.reassociate_global(32, 12, 768) and not A.reassociate_global(128, 12, 768)
