"""Checkpoint I/O: load_pretrained / save_pretrained, safetensors / sharded / .bin weights, unsafe
pickles refused, the Flax checkpoint format restored sharded, the RoBERTa-config check, atomic output
directories and tokenizer files."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import longformer_jax as lj
from longformer_jax import pretrained
from tests.conftest import REPO, max_diff, tiny_hf_config
from tests.test_modeling import batch, make_pair


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


@pytest.mark.parametrize("weights", ["safetensors", "bin", "sharded"])
def test_load_pretrained_from_an_hf_directory(torch, tmp_path, weights):
    tm, model, params, cfg = make_pair(torch, "masked-lm")
    tm.save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if weights == "sharded" else {}))
    if weights == "bin":  # the older format: a pickle, read with torch.load(weights_only=True)
        (tmp_path / "model.safetensors").unlink()
        torch.save(tm.state_dict(), tmp_path / "pytorch_model.bin")
    if weights == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(pretrained.find_weight_files(tmp_path)) > 1
    else:
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------- Flax format
@pytest.mark.slow
def test_flax_checkpoint_restores_sharded(torch, tmp_path):
    """load_flax_checkpoint reads the params straight into a target sharding."""
    tm, model, params, cfg = make_pair(torch, "masked-lm")
    tm.save_pretrained(tmp_path / "hf")
    config, task, hf_params = pretrained.load_hf_checkpoint(tmp_path / "hf")
    assert task == "masked-lm"
    pretrained.save_flax_checkpoint(tmp_path / "flax", config, hf_params, task)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, _, params = pretrained.load_flax_checkpoint(tmp_path / "flax", sharding=replicated)
    for leaf in jax.tree.leaves(params):
        assert leaf.sharding == replicated
    # Eight devices (a separate process: the device count is fixed when JAX starts): the word
    # embeddings split over a 4 x 2 mesh, everything else replicated.
    script = (
        "import sys, jax, numpy as np\n"
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
        "from longformer_jax import pretrained\n"
        "mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))\n"
        "def rule(path, shape):\n"
        "    name = '/'.join(str(getattr(k, 'key', k)) for k in path)\n"
        "    spec = P('data', 'model') if name.endswith('word_embeddings/embedding') else P()\n"
        "    return NamedSharding(mesh, spec)\n"
        "_, _, params = pretrained.load_flax_checkpoint(sys.argv[1], sharding=rule)\n"
        "emb = params['longformer']['embeddings']['word_embeddings']['embedding']\n"
        "assert len(emb.sharding.device_set) == 8 and emb.addressable_shards[0].data.shape == (25, 16)\n"
        "print('ok', emb.shape)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "flax")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=8"
        ),
    )
    assert r.returncode == 0 and "ok (100, 32)" in r.stdout, r.stderr[-2000:]
    # lj.load_pretrained reads the converted directory too.
    model, params2 = lj.load_pretrained(str(tmp_path / "flax"), task="masked-lm")
    assert type(model).__name__ == "LongformerForMaskedLM"
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), params, params2)
    assert all(jax.tree.leaves(same))
    # ... into another task (the encoder kept, a fresh head) and another layer layout.
    seq, ps = lj.load_pretrained(str(tmp_path / "flax"), task="sequence-classification", scan_layers=False)
    np.testing.assert_array_equal(
        ps["longformer"]["embeddings"]["word_embeddings"]["embedding"],
        params["longformer"]["embeddings"]["word_embeddings"]["embedding"],
    )
    with pytest.raises(pretrained.ConversionError, match="is not a Flax checkpoint directory"):
        pretrained.load_flax_checkpoint(tmp_path / "hf")


# ---------------------------------------------------------------------------------------- config check
def test_roberta_config_is_refused_in_one_place(torch, tmp_path):
    """A plain RoBERTa config.json: LongformerConfig and load_pretrained refuse it alike, pointing to the
    RoBERTa converter; allenai's originals (model_type roberta with attention_window, one-sided) load."""
    import transformers

    roberta = transformers.RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    ).to_dict()
    with pytest.raises(ValueError, match="model_type='roberta' and no attention_window.*convert.roberta_to_longformer"):
        lj.LongformerConfig.from_dict(roberta)
    tm, model, params, cfg = make_pair(torch, "masked-lm", attention_window=8)
    tm.save_pretrained(tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**roberta, "architectures": ["RobertaForMaskedLM"]}))
    with pytest.raises(pretrained.ConversionError, match="convert.roberta_to_longformer"):
        lj.load_pretrained(tmp_path)
    allenai = {
        **hf_cfg,
        "model_type": "roberta",
        "attention_window": [4, 4],
        "attention_mode": "longformer",
        "architectures": ["RobertaForMaskedLM"],
    }
    (tmp_path / "config.json").write_text(json.dumps(allenai))
    model2, params2 = lj.load_pretrained(tmp_path)
    assert model2.config.attention_windows == (8, 8)
    ids, am, gm = batch("blocks", np.random.default_rng(1))
    a = model.apply({"params": params}, ids, attention_mask=am, global_attention_mask=gm).logits
    b = model2.apply({"params": params2}, ids, attention_mask=am, global_attention_mask=gm).logits
    assert max_diff(a, b) == 0.0


# ---------------------------------------------------------------------------------------- directories, files
def test_atomic_output_dir(tmp_path):
    dst = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError), pretrained.atomic_output_dir(dst) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("fails half-way")
    assert not (tmp_path / "new").exists()  # nothing left: neither dst, its parent nor a temporary
    with pretrained.atomic_output_dir(dst) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not dst.exists()
    assert sorted(os.listdir(dst)) == ["a.txt"] and sorted(os.listdir(dst.parent)) == ["out"]
    with pytest.raises(pretrained.ConversionError, match="already exists and is not empty.*--overwrite"):
        with pretrained.atomic_output_dir(dst):
            pass
    with pretrained.atomic_output_dir(dst, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(os.listdir(dst)) == ["b.txt"] and sorted(os.listdir(dst.parent)) == ["out"]


def test_save_tokenizer_copies_every_tokenizer_file(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "spiece.model", "config.json", "model.safetensors"):
        (src / name).write_text(name)
    assert pretrained.save_tokenizer(src, dst) == ["tokenizer_config.json", "vocab.txt", "spiece.model"]
    assert sorted(os.listdir(dst)) == ["spiece.model", "tokenizer_config.json", "vocab.txt"]
    assert pretrained.save_tokenizer(None, dst) == []
    assert pretrained.save_tokenizer(dst, dst) == ["tokenizer_config.json", "vocab.txt", "spiece.model"]
