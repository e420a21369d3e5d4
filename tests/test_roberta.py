"""RoBERTa -> long Longformer: exactness below RoBERTa's old limit, position rows copied in repeats,
global projections copied, heads and bare models, shape errors from the model's own abstract init."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import roberta_to_longformer as r2l_cmd  # noqa: E402
from longformer_jax import pretrained  # noqa: E402
from longformer_jax.roberta import extend_position_embeddings, roberta_to_longformer  # noqa: E402
from tests.hf_fixtures import VOCAB, make_roberta, tokenizer_dir  # noqa: E402,F401


def tiny_roberta(model_class: str, max_position_embeddings: int, num_hidden_layers: int = 1):
    """(config, numpy state dict) of a random RoBERTa of hidden size 8."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=1,
    )
    return cfg, {k: v.numpy() for k, v in getattr(transformers, model_class)(cfg).state_dict().items()}


@pytest.mark.slow
def test_roberta_to_longformer_is_exact(tmp_path, tokenizer_dir):  # noqa: F811
    """Below RoBERTa's old limit, with a window covering the whole input and no global tokens, the
    long model (HF and Flax) gives RoBERTa's outputs; above it, it runs at the new length."""
    src, dst = tmp_path / "roberta", tmp_path / "long"
    roberta = make_roberta(src, tokenizer_dir)  # old limit: 34 - 2 = 32 tokens
    max_length = 128
    assert (
        r2l_cmd.main(
            [str(src), str(dst), "--max-length", str(max_length), "--attention-window", "64", "--format", "both"]
        )
        == 0
    )

    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "longformer" and cfg["architectures"] == ["LongformerForMaskedLM"]
    assert cfg["attention_window"] == [64, 64]
    assert cfg["max_position_embeddings"] == max_length + 3  # as the seed: 4096 -> 4099
    tok = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert tok.model_max_length == max_length

    long_pt, info = transformers.AutoModelForMaskedLM.from_pretrained(str(dst), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    long_pt.eval()
    sd_r, sd_l = roberta.state_dict(), long_pt.state_dict()
    old = sd_r["roberta.embeddings.position_embeddings.weight"].numpy()
    new = sd_l["longformer.embeddings.position_embeddings.weight"].numpy()
    assert new.shape == (max_length + 3, 32)
    np.testing.assert_array_equal(new[:2], old[:2])
    for row in range(2, new.shape[0]):
        np.testing.assert_array_equal(new[row], old[2 + (row - 2) % 32])
    for i in range(2):
        for n in ("query", "key", "value"):
            p = f"longformer.encoder.layer.{i}.attention.self."
            assert torch.equal(sd_l[f"{p}{n}_global.weight"], sd_l[f"{p}{n}.weight"])
            r = f"roberta.encoder.layer.{i}.attention.self.{n}.weight"
            assert torch.equal(sd_l[f"{p}{n}.weight"], sd_r[r])

    # Exactness below the old limit: 30 tokens (+ a padded second row), window 64 covers it all.
    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB, size=(2, 30))
    ids[:, 0], ids[:, -1] = 0, 2
    attn = np.ones_like(ids)
    ids[1, 20:], attn[1, 20:] = 1, 0
    with torch.no_grad():
        inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn)}
        ref = roberta(**inputs).logits.numpy()
        got_pt = long_pt(**inputs).logits.numpy()
    valid = attn.astype(bool)
    d_pt = float(np.abs(ref - got_pt)[valid].max())
    assert d_pt <= 1e-5, d_pt

    model, params = pretrained.load_pretrained(str(dst), task="masked-lm")  # the Flax checkpoint in the same dir
    assert pretrained.is_flax_checkpoint(dst)
    with jax.default_matmul_precision("highest"):
        got_fx = np.asarray(
            model.apply(
                {"params": params},
                ids.astype(np.int32),
                attention_mask=attn.astype(np.int32),
                global_attention_mask=np.zeros_like(ids, np.int32),
            ).logits
        )
    d_fx = float(np.abs(ref - got_fx)[valid].max())
    print(f"RoBERTa vs long model, max abs diff: PyTorch {d_pt:.2e}, Flax {d_fx:.2e}")
    assert d_fx <= 1e-5, d_fx

    # Beyond the old limit: the full new length runs, finite, right shape.
    long_ids = rng.integers(5, VOCAB, size=(1, max_length)).astype(np.int32)
    glob = np.zeros_like(long_ids)
    glob[:, 0] = 1
    out = model.apply({"params": params}, long_ids, global_attention_mask=glob).logits
    assert out.shape == (1, max_length, VOCAB) and bool(np.isfinite(np.asarray(out)).all())


@pytest.mark.parametrize("max_length", [4096, 8192, 16384])
def test_roberta_to_longformer_lengths(max_length):
    """The library function at the usual lengths (state dict in, state dict out; tiny widths)."""
    cfg, sd = tiny_roberta("RobertaForMaskedLM", 514)
    sd["roberta.pooler.dense.weight"] = np.zeros((8, 8), np.float32)  # as roberta-base ships
    sd["roberta.pooler.dense.bias"] = np.zeros((8,), np.float32)
    lf_cfg, out, task = roberta_to_longformer(sd, max_length, 128, config=cfg)
    assert not any("pooler" in k for k in out)
    assert task == "masked-lm"
    assert lf_cfg["max_position_embeddings"] == max_length + 3
    pos = out["longformer.embeddings.position_embeddings.weight"]
    old = sd["roberta.embeddings.position_embeddings.weight"]
    assert pos.shape == (max_length + 3, 8)
    repeats = max_length // 512
    np.testing.assert_array_equal(
        pos[2 : 2 + 512 * repeats].reshape(repeats, 512, 8), np.broadcast_to(old[2:], (repeats, 512, 8))
    )
    assert "lm_head.decoder.weight" not in out and "lm_head.bias" in out
    assert not any(k.startswith("roberta.") or k.endswith("position_ids") for k in out)


def test_roberta_bare_model_keys(tmp_path):
    """A bare RobertaModel (no prefix, with pooler) becomes a base Longformer with a pooler."""
    cfg, sd = tiny_roberta("RobertaModel", 34)
    lf_cfg, out, task = roberta_to_longformer(sd, 64, 16, config=cfg)
    assert task == "base" and lf_cfg["architectures"] == ["LongformerModel"]
    assert "longformer.pooler.dense.weight" in out


def test_missing_and_misshapen_weights_are_named():
    """The expected shapes come from the model's abstract init for RoBERTa's config; the messages name
    the RoBERTa key, its shape, the expected one and the config values behind it."""
    cfg, sd = tiny_roberta("RobertaForMaskedLM", 34, num_hidden_layers=2)
    bad = {**sd, "roberta.encoder.layer.1.intermediate.dense.weight": np.zeros((12, 8), np.float32)}
    with pytest.raises(
        pretrained.ConversionError,
        match=r"roberta.encoder.layer.1.intermediate.dense.weight has shape \(12, 8\), expected "
        r"\(16, 8\) from config.json \(hidden_size 8, intermediate_size 16, vocab_size 300, "
        r"max_position_embeddings 34\)",
    ):
        roberta_to_longformer(bad, 64, 16, config=cfg)
    short = {**sd, "roberta.embeddings.position_embeddings.weight": np.zeros((30, 8), np.float32)}
    with pytest.raises(pretrained.ConversionError, match=r"position_embeddings.weight has shape \(30, 8\)"):
        roberta_to_longformer(short, 64, 16, config=cfg)
    missing = {k: v for k, v in sd.items() if "layer.0.output.LayerNorm" not in k}
    with pytest.raises(pretrained.ConversionError, match="the RoBERTa state dict: missing RoBERTa weights: ") as e:
        roberta_to_longformer(missing, 64, 16, config=cfg)
    names = str(e.value).split("missing RoBERTa weights: ")[1].split(", ")
    assert sorted(names) == [
        "roberta.encoder.layer.0.output.LayerNorm.bias",
        "roberta.encoder.layer.0.output.LayerNorm.weight",
    ]
    with pytest.raises(pretrained.ConversionError, match="max_position_embeddings 60 is too small"):
        roberta_to_longformer(sd, 64, 16, config=cfg, max_position_embeddings=60)


def test_extend_position_embeddings_repeats_the_real_rows():
    old = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)  # pad 1: rows 0, 1 kept, rows 2..5 repeated
    new = extend_position_embeddings(old, 11, pad_token_id=1)
    assert new.shape == (11, 2) and new.dtype == old.dtype
    np.testing.assert_array_equal(new[:, 0] // 2, [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 2])
    with pytest.raises(pretrained.ConversionError, match="needs more than 2"):
        extend_position_embeddings(old[:2], 11, pad_token_id=1)


def test_a_longformer_is_made_longer(tmp_path, tokenizer_dir):  # noqa: F811
    """A Longformer as the source (e.g. to split 64k-token documents over devices): its position rows
    copied in repeats, its own global projections and windows kept, the same outputs below its old limit."""
    from tests.hf_fixtures import make_hf_model

    src, dst = tmp_path / "longformer", tmp_path / "longer"
    source = make_hf_model("masked-lm", src, tokenizer_dir)  # 70 position rows: 67 tokens; windows [4, 8]
    assert r2l_cmd.main([str(src), str(dst), "--max-length", "256"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["attention_window"] == [4, 8] and cfg["max_position_embeddings"] == 259
    longer = transformers.AutoModelForMaskedLM.from_pretrained(str(dst)).eval()
    sd_s, sd_l = source.state_dict(), longer.state_dict()
    old = sd_s["longformer.embeddings.position_embeddings.weight"].numpy()
    new = sd_l["longformer.embeddings.position_embeddings.weight"].numpy()
    assert new.shape == (259, 32)
    np.testing.assert_array_equal(new[:2], old[:2])
    np.testing.assert_array_equal(new[2:], old[2 + (np.arange(257) % 68)])
    for k, v in sd_s.items():
        if "position" not in k:
            assert torch.equal(sd_l[k], v), k  # the global projections were not replaced by copies
    assert not torch.equal(
        sd_l["longformer.encoder.layer.0.attention.self.query_global.weight"],
        sd_l["longformer.encoder.layer.0.attention.self.query.weight"],
    )

    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(5, VOCAB, size=(2, 60)))
    glob = torch.zeros_like(ids)
    glob[:, [0, 17]] = 1
    with torch.no_grad():
        want = source(ids, global_attention_mask=glob).logits.numpy()
        got = longer(ids, global_attention_mask=glob).logits.numpy()
    assert float(np.abs(want - got).max()) <= 1e-5
    with pytest.raises(pretrained.ConversionError, match="or a Longformer to make longer"):
        roberta_to_longformer({}, 64, config={"model_type": "bert"})
