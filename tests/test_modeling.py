"""Parity of every head with the `transformers` PyTorch Longformer, gradients, jit and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import longformer_jax as lj
from tests.conftest import max_diff, tiny_hf_config

TOL = 1e-5

HF_CLASSES = {
    "base": "LongformerModel",
    "masked-lm": "LongformerForMaskedLM",
    "sequence-classification": "LongformerForSequenceClassification",
    "token-classification": "LongformerForTokenClassification",
    "question-answering": "LongformerForQuestionAnswering",
    "multiple-choice": "LongformerForMultipleChoice",
}


def make_pair(torch, task, seed=0, **cfg_overrides):
    import transformers

    hf_cfg = tiny_hf_config(**cfg_overrides)
    torch.manual_seed(seed)
    tm = getattr(transformers, HF_CLASSES[task])(hf_cfg).eval()
    cfg = lj.LongformerConfig.from_dict(hf_cfg.to_dict())
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    params = lj.params_from_state_dict(sd, cfg, task)
    return tm, lj.build_model(cfg, task), params, cfg


def batch(case, rng):
    """(ids, attention_mask, global_attention_mask) of the named case (numpy int64)."""
    if case == "mixed":  # B=3, L=21 (not a window multiple), right + interior padding, 3/0/1 globals
        B, L = 3, 21
        ids = rng.integers(5, 100, (B, L))
        am = np.ones((B, L), np.int64)
        am[1, 15:] = 0
        am[2, 5:8] = 0
        gm = np.zeros((B, L), np.int64)
        gm[0, [0, 3, 10]] = 1
        gm[2, 0] = 1
        gm[1, 17] = 1  # a global flag on padding stays padding
    elif case == "no-global":  # B=1, nothing global anywhere
        B, L = 1, 13
        ids = rng.integers(5, 100, (B, L))
        am = np.ones((B, L), np.int64)
        gm = np.zeros((B, L), np.int64)
    elif case == "blocks":  # the seed's layout: blocks of 8 starting with <s>/</s>, padded inside
        B, L, bs = 3, 32, 8
        ids = rng.integers(5, 100, (B, L))
        am = np.ones((B, L), np.int64)
        for b in range(B):
            for blk in range(L // bs):
                ids[b, blk * bs] = 0 if blk == 0 else 2
                fill = rng.integers(2, bs + 1)
                am[b, blk * bs + fill : (blk + 1) * bs] = 0
        am[2, 24:] = 0  # an empty trailing block
        gm = np.zeros((B, L), np.int64)
        gm[:, ::bs] = 1
        gm[0, 5] = 1  # rows hold different numbers of global tokens
    elif case == "many-global":  # 12 and 17 globals: more slots than fold into the queries (16/32 > H*G rule)
        B, L = 2, 40
        ids = rng.integers(5, 100, (B, L))
        am = np.ones((B, L), np.int64)
        am[1, 36:] = 0
        gm = np.zeros((B, L), np.int64)
        gm[0, ::3] = 1
        gm[1, :34:2] = 1
    else:
        raise ValueError(case)
    ids = np.where(am == 0, 1, ids)
    return ids, am, gm


def compare_outputs(jo, to, logits_fields):
    for jf, tf in logits_fields:
        assert max_diff(getattr(jo, jf), getattr(to, tf)) <= TOL, jf
    assert len(jo.hidden_states) == len(to.hidden_states)
    for a, b in zip(jo.hidden_states, to.hidden_states):
        assert max_diff(a, b) <= TOL
    for a, b in zip(jo.attentions, to.attentions):
        assert max_diff(a, b) <= TOL
    if to.global_attentions is None:
        assert jo.global_attentions is None
    else:
        for a, b in zip(jo.global_attentions, to.global_attentions):
            assert max_diff(a, b) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mixed", "no-global", "blocks", "many-global"])
def test_masked_lm_parity(torch, case):
    tm, model, params, cfg = make_pair(torch, "masked-lm")
    ids, am, gm = batch(case, np.random.default_rng(1))
    labels = np.where(np.random.default_rng(2).random(ids.shape) < 0.3, ids, -100)
    labels[:, 0] = ids[:, 0]
    with torch.no_grad():
        to = tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(am),
            global_attention_mask=torch.tensor(gm),
            labels=torch.tensor(labels),
            output_attentions=True,
            output_hidden_states=True,
        )
    jo = model.apply(
        {"params": params},
        ids,
        attention_mask=am,
        global_attention_mask=gm,
        labels=labels,
        output_attentions=True,
        output_hidden_states=True,
    )
    compare_outputs(jo, to, [("logits", "logits")])
    assert abs(float(jo.loss) - float(to.loss)) <= TOL


def test_base_model_with_pooler_parity(torch):
    tm, model, params, cfg = make_pair(torch, "base")
    assert "pooler" in params
    ids, am, gm = batch("mixed", np.random.default_rng(3))
    with torch.no_grad():
        to = tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(am),
            global_attention_mask=torch.tensor(gm),
            output_attentions=True,
            output_hidden_states=True,
        )
    jo = model.apply(
        {"params": params},
        ids,
        attention_mask=am,
        global_attention_mask=gm,
        output_attentions=True,
        output_hidden_states=True,
    )
    compare_outputs(jo, to, [("last_hidden_state", "last_hidden_state"), ("pooler_output", "pooler_output")])


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification"])
def test_sequence_classification_parity(torch, problem):
    num_labels = 1 if problem == "regression" else 3
    tm, model, params, cfg = make_pair(torch, "sequence-classification", num_labels=num_labels, problem_type=problem)
    rng = np.random.default_rng(4)
    ids, am, _ = batch("mixed", rng)
    if problem == "single_label_classification":
        labels = rng.integers(0, 3, (3,))
    elif problem == "regression":
        labels = rng.normal(size=(3,)).astype(np.float32)
    else:
        labels = (rng.random((3, 3)) < 0.5).astype(np.float32)
    # No global mask given: global attention on <s> automatically.
    with torch.no_grad():
        to = tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(am),
            labels=torch.tensor(labels),
            output_attentions=True,
            output_hidden_states=True,
        )
    jo = model.apply(
        {"params": params}, ids, attention_mask=am, labels=labels, output_attentions=True, output_hidden_states=True
    )
    compare_outputs(jo, to, [("logits", "logits")])
    assert abs(float(jo.loss) - float(to.loss)) <= TOL


@pytest.mark.slow
def test_token_classification_parity(torch):
    tm, model, params, cfg = make_pair(torch, "token-classification")
    rng = np.random.default_rng(5)
    ids, am, gm = batch("blocks", rng)
    labels = np.where(am == 1, rng.integers(0, 3, ids.shape), -100)
    with torch.no_grad():
        to = tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(am),
            global_attention_mask=torch.tensor(gm),
            labels=torch.tensor(labels),
            output_attentions=True,
            output_hidden_states=True,
        )
    jo = model.apply(
        {"params": params},
        ids,
        attention_mask=am,
        global_attention_mask=gm,
        labels=labels,
        output_attentions=True,
        output_hidden_states=True,
    )
    compare_outputs(jo, to, [("logits", "logits")])
    assert abs(float(jo.loss) - float(to.loss)) <= TOL


def qa_ids(rng, B=3, L=23):
    """<s> question </s></s> context </s> pad..., with questions of different lengths."""
    ids = rng.integers(5, 100, (B, L))
    am = np.ones((B, L), np.int64)
    for b, (q, end) in enumerate([(3, 20), (5, 23), (2, 15)][:B]):
        ids[b, 0] = 0
        ids[b, q] = ids[b, q + 1] = 2
        ids[b, end - 1] = 2
        am[b, end:] = 0
    return np.where(am == 0, 1, ids), am


@pytest.mark.slow
def test_question_answering_parity(torch):
    tm, model, params, cfg = make_pair(torch, "question-answering", num_labels=2)
    rng = np.random.default_rng(6)
    ids, am = qa_ids(rng)
    start, end = np.array([4, 7, 30]), np.array([6, 9, 31])  # 30/31 lie outside: ignored as in HF
    with torch.no_grad():
        to = tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(am),
            start_positions=torch.tensor(start),
            end_positions=torch.tensor(end),
            output_attentions=True,
            output_hidden_states=True,
        )
    jo = model.apply(
        {"params": params},
        ids,
        attention_mask=am,
        start_positions=start,
        end_positions=end,
        output_attentions=True,
        output_hidden_states=True,
    )
    compare_outputs(jo, to, [("start_logits", "start_logits"), ("end_logits", "end_logits")])
    assert abs(float(jo.loss) - float(to.loss)) <= TOL


@pytest.mark.slow
def test_multiple_choice_parity(torch):
    tm, model, params, cfg = make_pair(torch, "multiple-choice")
    rng = np.random.default_rng(7)
    ids, am = qa_ids(rng, B=3, L=23)
    ids, am = ids.reshape(1, 3, 23), am.reshape(1, 3, 23)
    ids = np.concatenate([ids, ids[:, ::-1]], 0)
    am = np.concatenate([am, am[:, ::-1]], 0)
    labels = np.array([2, 0])
    with torch.no_grad():
        to = tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(am),
            labels=torch.tensor(labels),
            output_attentions=True,
            output_hidden_states=True,
        )
    jo = model.apply(
        {"params": params}, ids, attention_mask=am, labels=labels, output_attentions=True, output_hidden_states=True
    )
    compare_outputs(jo, to, [("logits", "logits")])
    assert abs(float(jo.loss) - float(to.loss)) <= TOL


@pytest.mark.slow
def test_one_window_for_all_layers_parity(torch):
    tm, model, params, cfg = make_pair(torch, "masked-lm", attention_window=6 * 2)
    ids, am, gm = batch("mixed", np.random.default_rng(8))
    with torch.no_grad():
        to = tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(am),
            global_attention_mask=torch.tensor(gm),
            output_attentions=True,
            output_hidden_states=True,
        )
    jo = model.apply(
        {"params": params},
        ids,
        attention_mask=am,
        global_attention_mask=gm,
        output_attentions=True,
        output_hidden_states=True,
    )
    compare_outputs(jo, to, [("logits", "logits")])


def no_dropout(torch, tm):
    """Dropout off in a torch model kept in train mode (its probabilities are 0.1): an exact comparison."""
    tm.train()
    for m in tm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0


def mlm_grads_both(torch, pair, ids, am, gm, labels):
    """The masked-LM loss of both models on the same batch and labels, and each model's gradients by HF
    state-dict name: (jax loss, torch loss, jax grads, torch grads)."""
    tm, model, params, cfg = pair
    no_dropout(torch, tm)
    tm.zero_grad()
    out = tm(
        torch.tensor(ids),
        attention_mask=torch.tensor(am),
        global_attention_mask=torch.tensor(gm),
        labels=torch.tensor(labels),
    )
    out.loss.backward()
    torch_grads = {k: p.grad.numpy() for k, p in tm.named_parameters() if p.grad is not None}

    def loss_fn(p):
        return model.apply({"params": p}, ids, attention_mask=am, global_attention_mask=gm, labels=labels).loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return float(loss), out.loss.item(), lj.state_dict_from_params(grads, cfg, "masked-lm"), torch_grads


@pytest.mark.slow
def test_mlm_gradients_match_pytorch(torch):
    pair = make_pair(torch, "masked-lm")
    ids, am, gm = batch("mixed", np.random.default_rng(9))
    labels = np.where((np.random.default_rng(10).random(ids.shape) < 0.4) & (am == 1), ids, -100)
    labels[0, 1] = 7
    loss, torch_loss, jax_grads, torch_grads = mlm_grads_both(torch, pair, ids, am, gm, labels)
    assert abs(loss - torch_loss) <= TOL
    # torch ties lm_head.decoder.weight to the word embeddings: its grad is already summed in.
    assert set(jax_grads) == set(torch_grads), set(jax_grads) ^ set(torch_grads)
    worst = max(max_diff(jax_grads[k], torch_grads[k]) for k in torch_grads)
    assert worst <= 1e-4, worst
    # The global projections did receive gradient (the path is exercised, not just present).
    assert np.abs(jax_grads["longformer.encoder.layer.0.attention.self.query_global.weight"]).max() > 0


def _rel(a, b) -> float:
    """||a - b|| / ||b|| (the difference itself when b is 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale else float(np.linalg.norm(a))


@pytest.mark.slow
def test_masked_positions_loss_and_gradients_equal_full_logits(torch):
    """The head at the masked slots only: the same loss and the same gradient of every parameter
    (<= 1e-6 relative) as the full-vocabulary logits at every position with the same labels."""
    from train.masking import masked_slots

    _, model, params, cfg = make_pair(torch, "masked-lm")
    ids, am, gm = batch("blocks", np.random.default_rng(20))  # interior padding, 4 or 5 globals per row
    labels = np.where((np.random.default_rng(21).random(ids.shape) < 0.3) & (am == 1), ids, -100)
    labels[0, :] = -100  # a row with no label at all
    positions, slot_labels = masked_slots(labels, 12)  # K = 12 slots: some rows leave slots unused
    assert (positions == -1).any() and (positions >= 0).sum() == (labels != -100).sum()
    kw = dict(attention_mask=am, global_attention_mask=gm, num_global_slots=8)

    def full(p):
        return model.apply({"params": p}, ids, **kw, labels=labels).loss

    def masked(p):
        return model.apply({"params": p}, ids, **kw, labels=slot_labels, masked_positions=positions).loss

    loss_full, g_full = jax.jit(jax.value_and_grad(full))(params)
    loss_masked, g_masked = jax.jit(jax.value_and_grad(masked))(params)
    assert _rel(loss_masked, loss_full) <= 1e-6
    flat_full = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(g_full)}
    flat_masked = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(g_masked)}
    assert flat_full.keys() == flat_masked.keys() and len(flat_full) > 20
    # The key biases shift every score of a query alike, which the softmax ignores: their gradient is 0
    # (rounding noise, ~1e-12, on both sides); every other parameter's gradient is compared.
    zero = [k for k in flat_full if k.endswith("['key']['bias']") or k.endswith("['key_global']['bias']")]
    assert len(zero) == 4
    for k in zero:
        assert max(np.abs(flat_full[k]).max(), np.abs(flat_masked[k]).max()) <= 1e-10, k
    worst = max((_rel(flat_masked[k], flat_full[k]), k) for k in flat_full if k not in zero)
    assert worst[0] <= 1e-6, worst
    # The logits of the used slots are the full logits at those positions (eagerly, checked inputs).
    full_logits = np.asarray(model.apply({"params": params}, ids, **kw).logits)
    slot_logits = np.asarray(model.apply({"params": params}, ids, **kw, masked_positions=positions).logits)
    assert slot_logits.shape == positions.shape + (cfg.vocab_size,)
    used = positions >= 0
    rows = np.nonzero(used)[0]
    assert max_diff(slot_logits[used], full_logits[rows, positions[used]]) <= 1e-6


@pytest.mark.slow
def test_masked_positions_bad_input(torch):
    _, model, params, cfg = make_pair(torch, "masked-lm")
    ids = np.full((2, 10), 5)
    apply = lambda **k: model.apply({"params": params}, ids, **k)  # noqa: E731
    pos = np.array([[1, 3, -1], [0, -1, -1]])
    with pytest.raises(ValueError, match=r"masked_positions holds -2..3 but must lie in 0..9"):
        apply(masked_positions=np.array([[1, 3, -2], [0, -1, -1]]))
    with pytest.raises(ValueError, match=r"masked_positions holds -1..10 but must lie in 0..9"):
        apply(masked_positions=np.array([[1, 10, -1], [0, -1, -1]]))
    with pytest.raises(ValueError, match=r"expected integers of shape \(2, K\)"):
        apply(masked_positions=np.array([1, 3]))
    with pytest.raises(ValueError, match=r"labels are one per slot, shape \(B, K\)"):
        apply(masked_positions=pos, labels=np.full((2, 10), -100))
    with pytest.raises(ValueError, match="labels hold a target in an unused slot"):
        apply(masked_positions=pos, labels=np.array([[5, 6, 7], [5, -100, -100]]))
    out = apply(masked_positions=pos, labels=np.array([[5, 6, -100], [5, -100, -100]]))
    assert out.logits.shape == (2, 3, cfg.vocab_size) and np.isfinite(float(out.loss))
    _, tc, tc_params, _ = make_pair(torch, "token-classification")
    with pytest.raises(ValueError, match="LongformerForTokenClassification takes no masked_positions"):
        tc.apply({"params": tc_params}, ids, masked_positions=pos)


@pytest.mark.slow
def test_scan_and_remat_match_the_layer_loop(torch):
    tm, model, params, cfg = make_pair(torch, "masked-lm", attention_window=8)
    ids, am, gm = batch("blocks", np.random.default_rng(11))
    ref = model.apply(
        {"params": params},
        ids,
        attention_mask=am,
        global_attention_mask=gm,
        output_attentions=True,
        output_hidden_states=True,
    )
    sd = lj.state_dict_from_params(params, cfg, "masked-lm")
    for overrides in ({"scan_layers": True}, {"remat": True}, {"scan_layers": True, "remat": True}):
        c2 = cfg.replace(**overrides)
        p2 = lj.params_from_state_dict(sd, c2, "masked-lm")
        m2 = lj.build_model(c2, "masked-lm")
        out = m2.apply(
            {"params": p2},
            ids,
            attention_mask=am,
            global_attention_mask=gm,
            output_attentions=True,
            output_hidden_states=True,
        )
        assert max_diff(out.logits, ref.logits) <= TOL
        for a, b in zip(out.attentions, ref.attentions):
            assert max_diff(a, b) <= TOL
        # and the gradient path compiles and agrees
        g_ref = jax.grad(
            lambda p: model.apply({"params": p}, ids, attention_mask=am, global_attention_mask=gm, labels=ids).loss
        )(params)
        g2 = jax.grad(
            lambda p, m2=m2: m2.apply({"params": p}, ids, attention_mask=am, global_attention_mask=gm, labels=ids).loss
        )(p2)
        a = lj.state_dict_from_params(g_ref, cfg, "masked-lm")
        b = lj.state_dict_from_params(g2, c2, "masked-lm")
        assert max(max_diff(a[k], b[k]) for k in a) <= 1e-5


def test_scan_layers_needs_one_window():
    with pytest.raises(ValueError, match="scan_layers=True needs the same window"):
        lj.LongformerConfig(num_hidden_layers=2, attention_window=[4, 8], scan_layers=True)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(torch):
    tm, model, params, cfg = make_pair(torch, "masked-lm")
    ids, am, gm = batch("mixed", np.random.default_rng(12))
    ref = model.apply({"params": params}, ids, attention_mask=am, global_attention_mask=gm)
    m16 = lj.build_model(cfg.replace(dtype="bfloat16"), "masked-lm")
    out = m16.apply({"params": params}, ids, attention_mask=am, global_attention_mask=gm)
    assert out.logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(lj.init_params(m16, 0)))
    err = np.abs(np.asarray(out.logits) - np.asarray(ref.logits))
    assert np.isfinite(err).all() and err.mean() < 0.05 * np.abs(np.asarray(ref.logits)).mean() + 0.05


def test_jit_compiles_once_per_shape_and_slots(torch):
    _, model, params, cfg = make_pair(torch, "masked-lm")
    traces = []

    @jax.jit
    def fwd(p, ids, am, gm):
        traces.append(ids.shape)
        return model.apply({"params": p}, ids, attention_mask=am, global_attention_mask=gm, num_global_slots=4).logits

    rng = np.random.default_rng(13)
    for n_global in (0, 1, 3, 4):
        ids, am, gm = batch("mixed", rng)
        gm[:] = 0
        gm[:, :n_global] = 1
        fwd(params, ids, am, gm)
    assert len(traces) == 1
    # Eager calls pick the slots from the masks; different counts fall into few buckets.
    assert [lj.global_slot_bucket(n) for n in (0, 1, 2, 3, 5, 32, 33)] == [0, 1, 2, 4, 8, 32, 64]


def test_more_global_tokens_than_slots(torch):
    _, model, params, cfg = make_pair(torch, "masked-lm")
    ids, am, gm = batch("mixed", np.random.default_rng(14))  # row 0 has 3 global tokens
    with pytest.raises(ValueError, match="row 0 has 3 global tokens but num_global_slots=2"):
        model.apply({"params": params}, ids, attention_mask=am, global_attention_mask=gm, num_global_slots=2)
    out = jax.jit(
        lambda p, i, a, g: (
            model.apply({"params": p}, i, attention_mask=a, global_attention_mask=g, num_global_slots=2).logits
        )
    )(params, ids, am, gm)
    out = np.asarray(out)
    assert np.isnan(out[0]).all()  # never silently wrong
    assert np.isfinite(out[1:]).all()


def test_traced_masks_need_explicit_slots(torch):
    _, model, params, cfg = make_pair(torch, "masked-lm")
    ids, am, gm = batch("mixed", np.random.default_rng(15))
    with pytest.raises(ValueError, match="num_global_slots must be given"):
        jax.jit(lambda p, g: model.apply({"params": p}, ids, attention_mask=am, global_attention_mask=g).logits)(
            params, gm
        )


@pytest.mark.slow
def test_bad_input_errors(torch):
    _, model, params, cfg = make_pair(torch, "masked-lm")
    ok = np.full((1, 10), 5)
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
    with pytest.raises(ValueError, match=r"sequence length 129 exceeds .* 128"):
        apply(np.full((1, 129), 5))
    # trailing padding takes no position: a longer row whose real tokens fit is accepted, as in HF
    padded = np.concatenate([np.full((1, 120), 5), np.ones((1, 16), np.int64)], 1)
    assert np.isfinite(np.asarray(apply(padded, attention_mask=(padded != 1).astype(np.int32)).logits)).all()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 9\) but input_ids has shape \(1, 10\)"):
        apply(ok, attention_mask=np.ones((1, 9)))
    with pytest.raises(ValueError, match=r"global_attention_mask has shape"):
        apply(ok, global_attention_mask=np.ones((2, 10)))
    with pytest.raises(ValueError, match=r"token id 100, outside the vocabulary \[0, 100\)"):
        apply(np.array([[5, 100, 7]]))
    with pytest.raises(ValueError, match="shape \\(batch, sequence_length\\)"):
        apply(np.full((10,), 5))

    _, qa, qa_params, _ = make_pair(torch, "question-answering", num_labels=2)
    ids, am = qa_ids(np.random.default_rng(16))
    ids[1, 7] = 2  # a fourth separator
    with pytest.raises(ValueError, match="row 1 holds 4 separator tokens"):
        qa.apply({"params": qa_params}, ids, attention_mask=am)

    _, mc, mc_params, _ = make_pair(torch, "multiple-choice")
    with pytest.raises(ValueError, match="multiple choice expects input_ids of rank 3"):
        mc.apply({"params": mc_params}, ids, attention_mask=am)


def test_inputs_embeds_matches_input_ids(torch):
    tm, model, params, cfg = make_pair(torch, "base")
    ids = np.random.default_rng(17).integers(5, 100, (2, 11))
    emb = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])[ids]
    a = model.apply({"params": params}, ids).last_hidden_state
    b = model.apply({"params": params}, inputs_embeds=emb).last_hidden_state
    assert max_diff(a, b) <= TOL
    with torch.no_grad():
        to = tm(inputs_embeds=torch.tensor(emb)).last_hidden_state
    assert max_diff(b, to) <= TOL


@pytest.mark.slow
def test_dropout_is_active_only_when_not_deterministic(torch):
    _, model, params, cfg = make_pair(torch, "masked-lm")
    ids, am, gm = batch("mixed", np.random.default_rng(18))
    kw = dict(attention_mask=am, global_attention_mask=gm)
    a = model.apply({"params": params}, ids, **kw).logits
    b = model.apply({"params": params}, ids, **kw, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}).logits
    c = model.apply({"params": params}, ids, **kw, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}).logits
    d = model.apply({"params": params}, ids, **kw, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}).logits
    assert max_diff(a, b) > 1e-3
    assert max_diff(b, c) == 0.0
    assert max_diff(b, d) > 1e-3


def test_prepare_inputs_pads_merges_and_counts(torch):
    _, model, params, cfg = make_pair(torch, "base")
    ids, am, gm = batch("mixed", np.random.default_rng(19))  # L=21, windows 4/8; rows hold 3, 0 and 1 globals
    x = lj.prepare_inputs(cfg, ids, attention_mask=am, global_attention_mask=gm)
    assert (x.length, x.num_global_slots, x.global_columns) == (21, 4, 3)
    assert x.input_ids.shape == x.mask.shape == x.position_ids.shape == x.token_type_ids.shape == (3, 24)
    np.testing.assert_array_equal(np.asarray(x.mask[:, :21]), am * (gm + 1))  # a global flag on padding stays pad
    assert not np.asarray(x.mask[:, 21:]).any()
    assert (np.asarray(x.input_ids[:, 21:]) == cfg.pad_token_id).all()
    assert (np.asarray(x.position_ids)[np.asarray(x.mask) == 0] == cfg.pad_token_id).all()
    # The prepared inputs run under jit with no slot count to pass, and give the eager call's outputs.
    eager = model.apply({"params": params}, ids, attention_mask=am, global_attention_mask=gm, output_attentions=True)
    traced = jax.jit(lambda p, x: model.apply({"params": p}, x, output_attentions=True))(params, x)
    assert max_diff(traced.last_hidden_state, eager.last_hidden_state) <= TOL
    assert len(traced.attentions) == len(eager.attentions)
    for a, b in zip(traced.attentions, eager.attentions):
        assert max_diff(a, np.asarray(b)) <= TOL
    with pytest.raises(ValueError, match="already prepared"):
        model.apply({"params": params}, x, attention_mask=am)
    with pytest.raises(ValueError, match="num_global_slots=8 but the prepared inputs hold 4 slots"):
        model.apply({"params": params}, x, num_global_slots=8)
    with pytest.raises(ValueError, match="row 0 has 3 global tokens but num_global_slots=2"):
        lj.prepare_inputs(cfg, ids, attention_mask=am, global_attention_mask=gm, num_global_slots=2)
    _, mlm, mlm_params, _ = make_pair(torch, "masked-lm")
    with pytest.raises(ValueError, match="a ModelInputs goes to LongformerModel"):
        mlm.apply({"params": mlm_params}, x)
