"""Dilated and causal sliding windows: the blocked band against the dense reference (values, gradients,
probabilities), whole models against a dense-reference model, checkpoints, kernels and the pictures."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longformer_jax as lj
from longformer_jax import attention as A
from longformer_jax import kernels, patterns, pretrained
from longformer_jax.inputs import prepare_inputs
from longformer_jax.state_dict import convert_params

H, D = 4, 4

# (dilation, causal, number of global tokens per row): per layer (one int) and per head (one int each).
PATTERNS = [
    (2, False, (2, 1)),
    (3, False, (0, 0)),
    ((1, 2, 1, 4), False, (2, 1)),
    (1, True, (0, 0)),
    (1, True, (2, 1)),
    ((2, 1, 2, 1), True, (2, 1)),
    (4, True, (1, 3)),
]


def heads(x):  # (B, L, H, D) <-> (B, H, L, D)
    return jnp.swapaxes(x, 1, 2)


def random_case(seed, B, L, n_global, pad_frac=0.15):
    """q, k, v and the global projections (B, L, H, D); a merged mask with pads (interior and a tail) and globals."""
    rng = np.random.default_rng(seed)
    arrays = tuple(jnp.asarray(rng.normal(size=(B, L, H, D)), jnp.float32) for _ in range(6))
    mask = np.ones((B, L), np.int32)
    for b in range(B):
        mask[b, rng.random(L) < pad_frac] = 0
        mask[b, L - 5 * b :] = 0  # row b ends with 5b pads
        glob = rng.choice(np.flatnonzero(mask[b]), size=n_global[b], replace=False)
        mask[b, glob] = 2
    return arrays, jnp.asarray(mask)


def blocked_attention(q, k, v, qg, kg, vg, mask, w, dilation, causal, *, lean, num_slots=4):
    """The model's composition on (B, L, H, D) arrays: the band, then the global rows written over it."""
    slots = A.global_slots(mask == 2, num_slots)
    kw = dict(dilation=dilation, causal=causal)
    if lean:
        out = A.lean_band_attention_heads(heads(q), heads(k), heads(v), mask, w, slots, chunk_tokens=8, **kw)
        probs = None
    else:
        out, probs = A.sliding_window_attention_heads(
            heads(q), heads(k), heads(v), mask, w, slots, return_probs=True, **kw
        )
    qg_s = jnp.take_along_axis(heads(qg), slots.index_BxG[:, None, :, None], axis=2)
    out_g, _ = A.global_query_attention_heads(qg_s, heads(kg), heads(vg), mask, slots, causal=causal)
    return heads(A.scatter_global_rows_heads(out, out_g, slots)), probs, slots


@pytest.mark.slow
@pytest.mark.parametrize("dilation,causal,n_global", PATTERNS)
@pytest.mark.parametrize("lean", [False, True])
def test_band_equals_dense_values_and_gradients(dilation, causal, n_global, lean):
    w, L = 2, 48
    args, mask = random_case(7, 2, L, n_global)
    out, _, _ = blocked_attention(*args, mask, w, dilation, causal, lean=lean)
    ref, _ = A.dense_attention(*args, mask, w, dilation=dilation, causal=causal)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    assert np.all(np.asarray(out)[np.asarray(mask) == 0] == 0)

    ct = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
    f = lambda *a: jnp.sum(blocked_attention(*a, mask, w, dilation, causal, lean=lean)[0] * ct)
    f_ref = lambda *a: jnp.sum(A.dense_attention(*a, mask, w, dilation=dilation, causal=causal)[0] * ct)
    grads = jax.jit(jax.grad(f, argnums=range(6)))(*args)
    grads_ref = jax.grad(f_ref, argnums=range(6))(*args)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=2e-5)


@pytest.mark.parametrize("dilation,causal,n_global", PATTERNS)
def test_probabilities_in_hf_layout(dilation, causal, n_global):
    """Column G + w + k is the key i + d*k of the head's dilation d; the first G columns the global keys."""
    w, L, B = 2, 48, 2
    args, mask = random_case(11, B, L, n_global)
    _, probs, slots = blocked_attention(*args, mask, w, dilation, causal, lean=False)
    _, ref_p = A.dense_attention(*args, mask, w, dilation=dilation, causal=causal)
    probs, ref_p, m = np.asarray(probs), np.asarray(ref_p), np.asarray(mask)
    G = slots.index_BxG.shape[1]
    assert probs.shape == (B, H, L, G + 2 * w + 1)
    d_H = np.broadcast_to(np.asarray(dilation), (H,))
    for b in range(B):
        idx, valid = np.asarray(slots.index_BxG[b]), np.asarray(slots.valid_BxG[b])
        local = np.flatnonzero(m[b] == 1)  # global rows are replaced by the caller; pad rows are zero
        for h in range(H):
            for i in local:
                want_g = np.where(valid, ref_p[b, h, i, idx], 0.0)
                np.testing.assert_allclose(probs[b, h, i, :G], want_g, atol=1e-6)
                j = i + d_H[h] * np.arange(-w, w + 1)
                inside = (j >= 0) & (j < L)
                want = np.where(inside, ref_p[b, h, i, np.clip(j, 0, L - 1)], 0.0)
                want = np.where(inside & (m[b, np.clip(j, 0, L - 1)] == 1), want, 0.0)  # global keys: own columns
                np.testing.assert_allclose(probs[b, h, i, G:], want, atol=1e-6)
            np.testing.assert_allclose(probs[b, h, local].sum(-1), 1.0, atol=1e-5)
            assert np.all(probs[b, h, m[b] == 0] == 0)
    if causal:
        assert np.all(probs[..., G + w + 1 :] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("causal,dilation", [(True, 1), (True, (2, 1)), (False, 2)])
def test_lean_band_dropout_gradient_matches_autodiff(causal, dilation):
    """With dropout, the recomputing backward of a causal or dilated band equals autodiff of its forward."""
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(2, 2, 32, 4)), jnp.float32) for _ in range(3))
    mask = np.ones((2, 32), np.int32)
    mask[0, [3, 17]] = 2
    mask[1, 28:] = 0
    mask[1, 9] = 2
    mask = jnp.asarray(mask)
    sl = A.global_slots(mask == 2, 2)
    rng = jax.random.PRNGKey(3)
    kw = dict(causal=causal, dilation=dilation)

    def lean(q, k, v):
        return A.lean_band_attention_heads(
            q, k, v, mask, 4, sl, dropout_rate=0.3, dropout_rng=rng, chunk_tokens=8, **kw
        )

    def forward_only(q, k, v, m, w, kg, vg, gvalid, r, rows_per_row=1):  # the same forward, without custom VJP
        band = A._Band(w, 4, A._chunk_blocks(q.shape[2] // 4, 4, 8 // rows_per_row), 0.3, jnp.float32, causal)
        return A._band_forward(band, q, k, v, kg, vg, gvalid, m, r)[0], None

    plain = lambda q, k, v: A.band_pattern(forward_only, q, k, v, mask, 4, sl, dilation, causal, rng)[0]
    no_dropout = jax.jit(lambda q, k, v: A.lean_band_attention_heads(q, k, v, mask, 4, sl, **kw))
    out = jax.jit(lean)(q, k, v)
    assert not np.allclose(np.asarray(out), np.asarray(no_dropout(q, k, v)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(plain)(q, k, v)))
    ct = jnp.asarray(r.normal(size=q.shape), jnp.float32)
    g1 = jax.jit(jax.grad(lambda *a: jnp.sum(lean(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(lambda *a: jnp.sum(plain(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_causal_band_does_less_work():
    """The causal band's blocks see C + w keys, the two-sided band's C + 2w: fewer flops, compiled."""
    x = jax.ShapeDtypeStruct((1, 2, 512, 16), jnp.float32)
    m = jnp.ones((1, 512), jnp.int32)

    def flops(causal):
        f = lambda q, k, v: A.lean_band_attention_heads(q, k, v, m, 32, causal=causal)
        return jax.jit(f).lower(x, x, x).compile().cost_analysis()["flops"]

    assert flops(True) < 0.8 * flops(False)


def test_pattern_errors():
    q = jnp.zeros((1, 2, 24, 4))
    m = jnp.ones((1, 24), jnp.int32)
    with pytest.raises(
        ValueError,
        match=r"sequence length 24 must be a multiple of the window 2w=4 times the "
        r"dilation 4 \(16\)",
    ):
        A.lean_band_attention_heads(q, q, q, m, 2, dilation=4)
    with pytest.raises(ValueError, match=r"one int >= 1 per head \(2 heads\)"):
        A.sliding_window_attention_heads(q, q, q, m, 2, dilation=(1, 2, 3))
    with pytest.raises(ValueError, match="give an int >= 1"):
        A.lean_band_attention_heads(q, q, q, m, 2, dilation=0)


# ---------------------------------------------------------------------------------------- whole models
def small_config(**kw):
    base = dict(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        attention_window=[4, 8],
        max_position_embeddings=80,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return lj.LongformerConfig(**{**base, **kw})


def small_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 60, (2, 37))
    am = np.ones_like(ids)
    am[1, 29:] = 0
    am[0, 10:12] = 0
    gm = np.zeros_like(ids)
    gm[:, 0] = 1
    gm[0, 20] = 1
    return np.where(am == 0, 1, ids), am, gm


def dense_model(cfg, params, x):
    """The encoder on prepared inputs ``x``, written out with ``attention.dense_attention``: the reference
    for a model's wiring (which layer and head gets which pattern, the global rows, the padding)."""
    h = lj.modeling.LongformerEmbeddings(cfg).apply(
        {"params": params["embeddings"]}, x.input_ids, x.token_type_ids, x.position_ids
    )
    B, L, E = h.shape
    Hh, Dh = cfg.num_attention_heads, cfg.head_dim
    norm = lambda t, p: (
        (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True) + cfg.layer_norm_eps) * p["scale"]
        + p["bias"]
    )
    lin = lambda t, p: t @ p["kernel"] + p["bias"]
    for i in range(cfg.num_hidden_layers):
        p = params["encoder"][f"layer_{i}"]
        a = p["attention"]["self"]
        proj = lambda name, scale=1.0, h=h, a=a: (lin(h, a[name]) * scale).reshape(B, L, Hh, Dh)
        s = 1.0 / np.sqrt(Dh)
        out, _ = A.dense_attention(
            proj("query", s),
            proj("key"),
            proj("value"),
            proj("query_global", s),
            proj("key_global"),
            proj("value_global"),
            x.mask,
            cfg.attention_windows[i] // 2,
            dilation=cfg.attention_dilations[i],
            causal=cfg.causal_attention,
        )
        h = norm(
            lin(out.reshape(B, L, E), p["attention"]["output"]["dense"]) + h, p["attention"]["output"]["LayerNorm"]
        )
        z = jax.nn.gelu(lin(h, p["intermediate"]["dense"]), approximate=False)
        h = norm(lin(z, p["output"]["dense"]) + h, p["output"]["LayerNorm"])
    return h[:, : x.length]


MODEL_PATTERNS = [
    dict(attention_dilation=(2, (1, 2, 1, 3))),  # layer 0 dilated, layer 1 per head
    dict(causal_attention=True),
    dict(attention_dilation=(1, 2), causal_attention=True),
]


@pytest.mark.slow
@pytest.mark.parametrize("kw", MODEL_PATTERNS)
def test_model_equals_dense_reference_model(kw):
    cfg = small_config(**kw)
    model = lj.LongformerModel(cfg, add_pooling_layer=False)
    ids, am, gm = small_batch()
    params = lj.init_params(model, 0)
    run = lambda p: model.apply({"params": p}, ids, am, gm, num_global_slots=2).last_hidden_state
    out = jax.jit(run)(params)
    x = prepare_inputs(cfg, ids, am, gm)
    ref = jax.jit(lambda p: dense_model(cfg, p, x))(params)
    assert out.shape == (2, 37, 16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    real = jnp.asarray(am)[..., None]  # pad rows have no meaning of their own
    ct = jnp.asarray(np.random.default_rng(3).normal(size=out.shape), jnp.float32) * real
    g = jax.jit(jax.grad(lambda p: jnp.sum(run(p) * ct)))(params)
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(dense_model(cfg, p, x) * ct)))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.slow
def test_causal_model_does_not_see_the_future_and_eager_equals_jit():
    """Changing a token changes no output before it (globals included, as they are causal too)."""
    cfg = small_config(causal_attention=True, attention_dilation=(2, (1, 2, 1, 3)))
    model = lj.LongformerModel(cfg, add_pooling_layer=False)
    ids, am, gm = small_batch(1)
    params = lj.init_params(model, 0)
    a = model.apply({"params": params}, ids, am, gm).last_hidden_state
    jitted = jax.jit(lambda p: model.apply({"params": p}, ids, am, gm, num_global_slots=2).last_hidden_state)
    np.testing.assert_allclose(np.asarray(jitted(params)), np.asarray(a), atol=1e-6)
    ids2 = ids.copy()
    ids2[:, 25] = (ids2[:, 25] + 7) % 60
    b = model.apply({"params": params}, ids2, am, gm).last_hidden_state
    np.testing.assert_array_equal(np.asarray(a[:, :25]), np.asarray(b[:, :25]))
    assert not np.allclose(np.asarray(a[0, 25:]), np.asarray(b[0, 25:]))


@pytest.mark.slow
def test_scanned_layers_and_output_attentions():
    cfg = small_config(attention_window=8, attention_dilation=2, causal_attention=True)
    ids, am, gm = small_batch(2)
    model = lj.build_model(cfg, "masked-lm")
    params = lj.init_params(model, 1)
    out = model.apply({"params": params}, ids, am, gm, output_attentions=True)
    s_cfg, s_params = convert_params(params, cfg, "masked-lm", scan_layers=True, allow_new_head=False)
    s_out = lj.build_model(s_cfg, "masked-lm").apply({"params": s_params}, ids, am, gm)
    assert s_cfg.scan_layers and s_cfg.attention_dilation == 2 and s_cfg.causal_attention
    np.testing.assert_allclose(np.asarray(s_out.logits), np.asarray(out.logits), atol=1e-5)
    # HF's layout: (B, heads, L, x + 2w + 1); the causal band leaves the columns of keys after i at zero
    att = np.asarray(out.attentions[0])
    assert att.shape == (2, 4, 37, 2 + 9)
    assert np.all(att[..., 2 + 5 :] == 0)
    local = (am == 1) & (gm == 0)
    np.testing.assert_allclose(att.sum(-1)[np.broadcast_to(local[:, None], att.shape[:3])], 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_flax_round_trip_and_hf_export_refused(tmp_path, capsys):
    from convert import flax_to_hf

    cfg = small_config(attention_dilation=(1, (1, 2, 2, 1)), causal_attention=True)
    model = lj.build_model(cfg, "masked-lm")
    params = lj.init_params(model, 0)
    ids, am, gm = small_batch()
    pretrained.save_flax_checkpoint(tmp_path / "flax", cfg, params, "masked-lm")
    settings = json.loads((tmp_path / "flax" / pretrained.FORMAT_FILE).read_text())["settings"]
    assert settings["attention_dilation"] == [1, [1, 2, 2, 1]] and settings["causal_attention"] is True
    hf_config = json.loads((tmp_path / "flax" / "config.json").read_text())
    assert "attention_dilation" not in hf_config and "causal_attention" not in hf_config

    model2, params2 = lj.load_pretrained(tmp_path / "flax")
    assert model2.config == cfg
    a = model.apply({"params": params}, ids, am, gm).logits
    b = model2.apply({"params": params2}, ids, am, gm).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    for export in (
        lambda: lj.save_pretrained(tmp_path / "hf", model, params),
        lambda: pretrained.save_hf_checkpoint(tmp_path / "hf", cfg, params, "masked-lm"),
        lambda: cfg.save_pretrained(tmp_path / "hf"),
        cfg.to_hf_dict,
    ):
        with pytest.raises(
            ValueError,
            match=r"attention_dilation=\(1, \(1, 2, 2, 1\)\), causal_attention=True has "
            "no counterpart in transformers",
        ):
            export()
        assert not (tmp_path / "hf").exists()
    assert flax_to_hf.main([str(tmp_path / "flax"), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Flax checkpoint format" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_kernels_refuse_patterns_and_auto_takes_blocked():
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(1, 2, 32, 4)), jnp.float32) for _ in range(3))
    m = jnp.ones((1, 32), jnp.int32)
    for impl in ("splash", "pallas-gpu"):
        with pytest.raises(
            ValueError,
            match=rf"attention_implementation='{impl}' implements only the two-sided, "
            r"undilated band, but attention_dilation=2 asked",
        ):
            kernels.band_attention(impl, q, k, v, m, 4, dilation=2, interpret=True)
        with pytest.raises(ValueError, match="but causal_attention=True asked"):
            kernels.band_attention(impl, q, k, v, m, 4, causal=True, interpret=True)
    for backend in ("tpu", "gpu", "cpu"):
        assert kernels.resolve_implementation("auto", backend, pattern=True) == "blocked"
    want = A.lean_band_attention_heads(q, k, v, m, 4, dilation=(1, 2), causal=True)
    got = kernels.band_attention("auto", q, k, v, m, 4, dilation=(1, 2), causal=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---------------------------------------------------------------------------------------- pictures
@pytest.mark.parametrize(
    "kw,n_global,pads",
    [
        (dict(attention_window=8), (0, 0), False),
        (dict(attention_window=4, attention_dilation=((1, 3, 2, 1),)), (2, 1), True),
        (dict(attention_window=4, causal_attention=True), (1, 2), True),
        (dict(attention_window=8, attention_dilation=2, causal_attention=True), (2, 0), True),
    ],
)
@pytest.mark.slow
def test_probed_pattern_equals_dense_mask(kw, n_global, pads):
    cfg = small_config(num_hidden_layers=1, **kw)
    rng = np.random.default_rng(5)
    L = 40
    am = np.ones((2, L), np.int32)
    if pads:
        am[0, 33:] = 0
        am[1, 5:7] = 0
    gm = np.zeros((2, L), np.int32)
    for b in range(2):
        gm[b, rng.choice(np.flatnonzero(am[b]), n_global[b], replace=False)] = 1
    probed = patterns.attention_pattern(cfg, am, gm)
    want = A.attention_pattern_mask(
        jnp.asarray(am * (gm + 1)),
        cfg.attention_windows[0] // 2,
        4,
        dilation=cfg.attention_dilations[0],
        causal=cfg.causal_attention,
    )
    assert probed.shape == (2, 4, L, L) and probed.dtype == bool
    np.testing.assert_array_equal(probed, np.asarray(want))


@pytest.mark.slow
def test_picture_program_writes_the_patterns(tmp_path, capsys, monkeypatch):
    drawn = {}
    draw = patterns.draw

    def spy(p, pattern, mask, path):  # what each picture is drawn from
        drawn[p.name] = (p, pattern, mask)
        draw(p, pattern, mask, path)

    monkeypatch.setattr(patterns, "draw", spy)
    assert patterns.main(["--out", str(tmp_path / "pics")]) == 0
    names = [p.name for p in patterns.pictures(64)]
    assert sorted(f.name for f in (tmp_path / "pics").iterdir()) == sorted(f"{n}.png" for n in names)
    assert sorted(drawn) == sorted(names)
    for n in names:
        data = (tmp_path / "pics" / f"{n}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(data) < 60_000
        # what the picture shows is the dense statement of its pattern
        p, pattern, mask = drawn[n]
        dilation = p.dilation if isinstance(p.dilation, int) else p.dilation[0]
        want = A.attention_pattern_mask(
            jnp.asarray(mask)[None], p.window // 2, p.heads, dilation=dilation, causal=p.causal
        )[0]
        np.testing.assert_array_equal(pattern, np.asarray(want), err_msg=n)
    assert drawn["padding"][2].tolist().count(0) == 16 and drawn["global"][2].tolist().count(2) == 2
    assert patterns.main(["--out", str(tmp_path / "x"), "--length", "40"]) == 1
    assert "error: --length 40" in capsys.readouterr().err
