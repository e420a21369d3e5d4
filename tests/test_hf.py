"""HF state dict <-> Flax params: load_pretrained / save_pretrained, prefixes and quirks, clear failures."""

import json

import jax
import numpy as np
import pytest

import longformer_jax as lj
from tests.conftest import max_diff, tiny_hf_config
from tests.test_modeling import HF_CLASSES, batch, make_pair


def test_save_pretrained_loads_in_transformers_unchanged(torch, tmp_path):
    import transformers

    tm, model, params, cfg = make_pair(torch, "masked-lm")
    lj.save_pretrained(tmp_path, model, params)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors"]
    loaded, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded).__name__ == "LongformerForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, am, gm = batch("mixed", np.random.default_rng(0))
    with torch.no_grad():
        a = tm(torch.tensor(ids), attention_mask=torch.tensor(am), global_attention_mask=torch.tensor(gm)).logits
        b = loaded.eval()(
            torch.tensor(ids), attention_mask=torch.tensor(am), global_attention_mask=torch.tensor(gm)
        ).logits
    assert max_diff(a.numpy(), b) == 0.0


@pytest.mark.parametrize("task", sorted(HF_CLASSES))
def test_state_dict_roundtrip_every_head(torch, task):
    tm, model, params, cfg = make_pair(torch, task, num_labels=2 if task == "question-answering" else 3)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    back = lj.state_dict_from_params(params, cfg, task, include_tied=True)
    assert set(back) == set(sd), set(back) ^ set(sd)
    for k in sd:
        assert np.array_equal(back[k], sd[k]), k


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_load_pretrained_from_an_hf_directory(torch, tmp_path, weights):
    tm, model, params, cfg = make_pair(torch, "masked-lm")
    tm.save_pretrained(tmp_path)
    if weights == "bin":  # the older format: a pickle, read with torch.load(weights_only=True)
        (tmp_path / "model.safetensors").unlink()
        torch.save(tm.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / ("model.safetensors" if weights == "safetensors" else "pytorch_model.bin")).exists()
    model2, params2 = lj.load_pretrained(tmp_path, task="masked-lm")
    ids, am, gm = batch("blocks", np.random.default_rng(1))
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(am), global_attention_mask=torch.tensor(gm)).logits
    out = model2.apply({"params": params2}, ids, attention_mask=am, global_attention_mask=gm)
    assert max_diff(out.logits, ref) <= 1e-5


def test_load_pretrained_options_and_new_head(torch, tmp_path):
    tm, _, params, cfg = make_pair(torch, "masked-lm")
    tm.save_pretrained(tmp_path)
    model, p = lj.load_pretrained(tmp_path, task="sequence-classification", num_labels=4, dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and model.config.num_labels == 4
    assert p["classifier"]["out_proj"]["kernel"].shape == (32, 4)  # a fresh head, as transformers does
    np.testing.assert_array_equal(
        p["longformer"]["embeddings"]["word_embeddings"]["embedding"],
        params["longformer"]["embeddings"]["word_embeddings"]["embedding"],
    )
    with pytest.raises(ValueError, match="missing keys .*classifier"):
        lj.load_pretrained(tmp_path, task="sequence-classification", allow_new_head=False)
    scanned, ps = lj.load_pretrained(tmp_path, task="masked-lm", scan_layers=False, remat=True)
    assert scanned.config.remat


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


def test_load_errors(tmp_path, torch):
    with pytest.raises(ValueError, match="checkpoint directory nowhere does not exist"):
        lj.load_pretrained("./nowhere")
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config().to_dict()))
    with pytest.raises(ValueError, match="no weights in"):
        lj.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="task='fill-mask' is unknown"):
        lj.load_pretrained(tmp_path, task="fill-mask")


def test_unsafe_pickle_is_refused(torch, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    import pickle

    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config().to_dict()))
    torch.save({"x": Payload()}, tmp_path / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(ValueError, match="refusing to load .*pytorch_model.bin"):
        lj.load_pretrained(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("pooling", ["max", "attentive", "first", "last"])
def test_document_classification_pools_block_starts(torch, tmp_path, pooling):
    import transformers

    hf_cfg = tiny_hf_config()
    cfg = lj.LongformerConfig.from_dict(hf_cfg.to_dict())
    model = lj.LongformerForDocumentClassification(cfg, pooling=pooling, sentence_block_size=8)
    params = lj.init_params(model, 0)
    ids, am, gm = batch("blocks", np.random.default_rng(2))
    labels = np.array([0, 2, 1])
    out = model.apply({"params": params}, ids, attention_mask=am, labels=labels)
    # the same by hand from the encoder (global attention on every block start by default)
    enc = lj.LongformerModel(cfg, add_pooling_layer=False).apply(
        {"params": params["longformer"]}, ids, attention_mask=am, global_attention_mask=gm * (np.arange(32) % 8 == 0)
    )
    starts = np.asarray(enc.last_hidden_state)[:, ::8]
    valid = am[:, ::8] == 1
    if pooling == "max":
        pooled = np.where(valid[..., None], starts, -np.inf).max(1)
    elif pooling == "first":
        pooled = starts[:, 0]
    elif pooling == "last":
        pooled = starts[np.arange(3), valid.sum(1) - 1]
    else:
        pa = params["pooler"] if "pooler" in params else params
        s = np.tanh(starts @ np.asarray(pa["dense"]["kernel"]) + np.asarray(pa["dense"]["bias"]))
        s = (s @ np.asarray(pa["attention"]["kernel"]) + np.asarray(pa["attention"]["bias"]))[..., 0]
        s = np.where(valid, s, -np.inf)
        wgt = np.exp(s - s.max(1, keepdims=True))
        wgt /= wgt.sum(1, keepdims=True)
        pooled = (wgt[..., None] * starts).sum(1)
    c = params["classifier"]
    x = np.tanh(pooled @ np.asarray(c["dense"]["kernel"]) + np.asarray(c["dense"]["bias"]))
    logits = x @ np.asarray(c["out_proj"]["kernel"]) + np.asarray(c["out_proj"]["bias"])
    assert max_diff(out.logits, logits) <= 1e-5
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert abs(float(out.loss) + logp[np.arange(3), labels].mean()) <= 1e-5
    # save / load keeps the head's settings, and the encoder part loads in transformers
    lj.save_pretrained(tmp_path, model, params)
    m2, p2 = lj.load_pretrained(tmp_path, task="document-classification")
    assert m2.pooling == pooling and m2.sentence_block_size == 8
    assert max_diff(m2.apply({"params": p2}, ids, attention_mask=am).logits, out.logits) == 0.0
    enc_only = transformers.LongformerModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert enc_only.config.attention_window == [4, 8]


def test_sequential_sentence_classification(torch):
    cfg = lj.LongformerConfig.from_dict(tiny_hf_config().to_dict())
    model = lj.LongformerForSequentialSentenceClassification(cfg, sentence_block_size=8)
    params = lj.init_params(model, 1)
    ids, am, _ = batch("blocks", np.random.default_rng(3))
    labels = np.random.default_rng(4).integers(0, 3, (3, 4))
    out = model.apply({"params": params}, ids, attention_mask=am, labels=labels)
    assert out.logits.shape == (3, 4, 3)
    # the empty trailing blocks of row 2 are ignored in the loss
    logits = np.asarray(out.logits)
    valid = am[:, ::8] == 1
    assert not valid[2, 3]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    assert abs(float(out.loss) - nll[valid].mean()) <= 1e-5
    with pytest.raises(ValueError, match="not a multiple of sentence_block_size=8"):
        model.apply({"params": params}, ids[:, :28], attention_mask=am[:, :28])
