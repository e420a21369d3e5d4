"""LongformerConfig: HF config.json in and out, allenai one-sided windows, validation errors."""

import json

import pytest

import longformer_jax as lj


def test_roundtrip_through_transformers(tmp_path):
    import transformers

    cfg = lj.LongformerConfig(
        vocab_size=50265,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        attention_window=[8, 16, 16],
        max_position_embeddings=4099,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
    )
    cfg.save_pretrained(tmp_path, architectures=["LongformerForMaskedLM"])
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "longformer"
    assert hf.attention_window == [8, 16, 16]
    assert hf.max_position_embeddings == 4099 and hf.layer_norm_eps == 1e-5 and hf.vocab_size == 50265
    back = lj.LongformerConfig.from_dict(hf.to_dict())
    assert back == cfg
    assert back.attention_windows == (8, 16, 16) and back.max_window == 16 and back.head_dim == 16
    assert back.max_sequence_length == 4099 - 2


def test_jax_options_are_not_written(tmp_path):
    cfg = lj.LongformerConfig(num_hidden_layers=2, attention_window=8, dtype="bfloat16", remat=True)
    cfg.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert "dtype" not in d and "remat" not in d and "scan_layers" not in d
    assert lj.LongformerConfig.from_pretrained(tmp_path, dtype="bfloat16").dtype == "bfloat16"


def test_unknown_fields_survive_a_roundtrip(tmp_path):
    d = lj.LongformerConfig(num_hidden_layers=1, attention_window=4).to_hf_dict()
    d["my_field"] = [1, 2]
    cfg = lj.LongformerConfig.from_dict(d)
    assert cfg.to_hf_dict()["my_field"] == [1, 2]


def test_allenai_one_sided_window_is_doubled():
    d = {
        "attention_mode": "longformer",
        "attention_window": [256] * 2,
        "attention_dilation": [1, 1],
        "autoregressive": False,
        "num_hidden_layers": 2,
        "model_type": "roberta",
    }
    cfg = lj.LongformerConfig.from_dict(d)
    assert cfg.attention_windows == (512, 512)
    assert "attention_mode" not in cfg.to_hf_dict()
    with pytest.raises(ValueError, match="dilated"):
        lj.LongformerConfig.from_dict({**d, "attention_dilation": [2, 1]})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"attention_window": 7}, "attention_window=7 is odd"),
        ({"attention_window": 0}, "attention_window=0 must be a positive even integer"),
        ({"attention_window": -4}, "attention_window=-4 must be a positive even integer"),
        ({"attention_window": [4, 8, 8]}, "attention_window has 3 entries but num_hidden_layers=2"),
        ({"attention_window": [6, 8]}, r"attention_window\[0\]=6 does not divide the largest window 8"),
        ({"attention_window": [4, 5]}, r"attention_window\[1\]=5 is odd"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size=30 is not divisible by num_attention_heads=4"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"hidden_act": "mish"}, "hidden_act='mish' is not supported"),
        ({"attention_window": 8, "attention_block_size": 3}, "attention_block_size=3 must be a positive divisor"),
    ],
)
def test_validation_errors(kwargs, message):
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, attention_window=8)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lj.LongformerConfig(**base)


def test_not_a_longformer_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        lj.LongformerConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        lj.LongformerConfig.from_pretrained(tmp_path / "missing")
