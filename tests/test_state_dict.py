"""HF state dict <-> Flax params: every head both ways, prefixes and quirks, scan layers, listed mismatches."""

import jax
import numpy as np
import pytest

import longformer_jax as lj
from longformer_jax.state_dict import convert_params, is_scanned, state_dict_shapes
from tests.test_modeling import HF_CLASSES, make_pair


@pytest.mark.parametrize("task", sorted(HF_CLASSES))
def test_state_dict_roundtrip_every_head(torch, task):
    tm, model, params, cfg = make_pair(torch, task, num_labels=2 if task == "question-answering" else 3)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    back = lj.state_dict_from_params(params, cfg, task, include_tied=True)
    assert set(back) == set(sd), set(back) ^ set(sd)
    for k in sd:
        assert np.array_equal(back[k], sd[k]), k


def test_prefixes_and_missing_global_projections(torch):
    tm, model, params, cfg = make_pair(torch, "masked-lm")
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    # allenai originals: `roberta.` prefix, and no *_global tensors (they become copies of the local ones)
    allenai = {k.replace("longformer.", "roberta.", 1): v for k, v in sd.items() if "_global" not in k}
    p = lj.params_from_state_dict(allenai, cfg, "masked-lm")
    sa = p["longformer"]["encoder"]["layer_0"]["attention"]["self"]
    np.testing.assert_array_equal(sa["query_global"]["kernel"], sa["query"]["kernel"])
    np.testing.assert_array_equal(sa["value_global"]["bias"], sa["value"]["bias"])
    # a bare LongformerModel state dict (no prefix) loads into the base model, and a prefixed one too
    base_sd = {k[len("longformer.") :]: v for k, v in sd.items() if k.startswith("longformer.")}
    cfg_np = cfg.replace(extra={**cfg.extra, "add_pooling_layer": False})
    pb = lj.params_from_state_dict(base_sd, cfg_np, "base")
    pb2 = lj.params_from_state_dict(sd, cfg_np, "base")  # lm_head keys of another head are ignored
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), pb, pb2))
    np.testing.assert_array_equal(
        pb["embeddings"]["word_embeddings"]["embedding"],
        params["longformer"]["embeddings"]["word_embeddings"]["embedding"],
    )


def test_scan_layers_params_roundtrip(torch):
    tm, model, params, cfg = make_pair(torch, "masked-lm", attention_window=8)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    c2 = cfg.replace(scan_layers=True)
    p2 = lj.params_from_state_dict(sd, c2, "masked-lm")
    assert p2["longformer"]["encoder"]["layer"]["layer"]["attention"]["self"]["query"]["kernel"].shape == (2, 32, 32)
    back = lj.state_dict_from_params(p2, c2, "masked-lm", include_tied=True)
    assert set(back) == set(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_mismatches_are_listed(torch):
    tm, model, params, cfg = make_pair(torch, "masked-lm")
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    bad = dict(sd)
    del bad["longformer.encoder.layer.1.output.dense.weight"]
    bad["longformer.encoder.layer.0.attention.self.query.weight"] = np.zeros((32, 31), np.float32)
    bad["longformer.encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        lj.params_from_state_dict(bad, cfg, "masked-lm")
    msg = str(e.value)
    assert "missing keys (1): longformer.encoder.layer.1.output.dense.weight" in msg
    assert "unexpected keys (1): longformer.encoder.layer.0.extra.weight" in msg
    assert "longformer.encoder.layer.0.attention.self.query.weight: checkpoint (32, 31) vs model (32, 32)" in msg


@pytest.mark.parametrize("task", sorted(HF_CLASSES))
def test_state_dict_shapes_are_transformers_shapes(torch, task):
    """The shapes from the abstract init are those of the PyTorch model's state dict (tied tensors and
    buffers aside)."""
    tm, _, _, cfg = make_pair(torch, task, num_labels=2 if task == "question-answering" else 3)
    want = {
        k: tuple(v.shape)
        for k, v in tm.state_dict().items()
        if not k.endswith("position_ids") and not k.startswith("lm_head.decoder.")
    }
    assert state_dict_shapes(cfg, task) == want


def test_convert_params_between_tasks_and_layouts(torch):
    tm, _, params, cfg = make_pair(torch, "masked-lm", attention_window=8)
    # masked-lm -> base with no new parameters: the encoder as it is, no pooler made up.
    cfg_b, pb = convert_params(params, cfg, "masked-lm", "base", allow_new_head=False)
    assert cfg_b.extra["add_pooling_layer"] is False and "pooler" not in pb
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), pb, params["longformer"])
    assert all(jax.tree.leaves(same))
    # ... and with new parameters allowed, a fresh pooler as transformers makes one.
    cfg_p, pp = convert_params(params, cfg, "masked-lm", "base")
    assert "add_pooling_layer" not in cfg_p.extra and pp["pooler"]["dense"]["kernel"].shape == (32, 32)
    # per-layer -> scanned -> per-layer gives the same tensors.
    cfg_s, ps = convert_params(params, cfg, "masked-lm", scan_layers=True)
    assert cfg_s.scan_layers and is_scanned(ps) and not is_scanned(params)
    _, back = convert_params(ps, cfg_s, "masked-lm", scan_layers=False)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), back, params)
    assert all(jax.tree.leaves(same))
    with pytest.raises(ValueError, match="missing keys .*classifier"):
        convert_params(params, cfg, "masked-lm", "sequence-classification", allow_new_head=False)
