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
    assert cfg.attention_dilation == 1 and cfg.causal_attention is False and not cfg.has_attention_pattern
    assert "attention_mode" not in cfg.to_hf_dict()


def test_allenai_dilation_and_autoregressive_are_read():
    d = {
        "attention_mode": "tvm",
        "attention_window": [4, 8],
        "attention_dilation": [2, 1],
        "autoregressive": True,
        "num_hidden_layers": 2,
        "model_type": "roberta",
    }
    cfg = lj.LongformerConfig.from_dict(d)
    assert cfg.attention_windows == (8, 16) and cfg.attention_dilation == (2, 1) and cfg.causal_attention
    assert cfg.pad_multiple == 16 and cfg.attention_dilations == (2, 1)
    assert "attention_dilation" not in cfg.extra and "autoregressive" not in cfg.extra
    with pytest.raises(ValueError, match=r"attention_dilation=\(2, 1\), causal_attention=True has no counterpart"):
        cfg.to_hf_dict()


def test_pattern_settings_survive_to_dict_and_stay_out_of_config_json(tmp_path):
    cfg = lj.LongformerConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        attention_window=[4, 8],
        attention_dilation=[3, [1, 2, 2, 4]],
        causal_attention=True,
    )
    assert cfg.attention_dilation == (3, (1, 2, 2, 4))  # lists (as JSON gives them) become tuples
    assert cfg.attention_dilations == (3, (1, 2, 2, 4)) and cfg.pad_multiple == 96  # lcm(4 * 3, 8 * 4)
    d = cfg.to_dict()
    assert d["attention_dilation"] == [3, [1, 2, 2, 4]] and d["causal_attention"] is True
    back = lj.LongformerConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.attention_windows == (4, 8)  # not mistaken for allenai's one-sided windows
    cfg.save_pretrained(tmp_path, hf_export=False)  # a Flax checkpoint's config.json: the patterns kept apart
    written = json.loads((tmp_path / "config.json").read_text())
    assert "attention_dilation" not in written and "causal_attention" not in written
    plain = lj.LongformerConfig(num_hidden_layers=2, attention_window=8, attention_dilation=(1, 1))
    assert not plain.has_attention_pattern and plain.pad_multiple == 8 and plain.to_hf_dict()["attention_window"] == 8


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
        ({"attention_dilation": 0}, "attention_dilation=0 must be an integer >= 1"),
        ({"attention_dilation": True}, "attention_dilation=True must be an integer >= 1"),
        ({"attention_dilation": (1, 2, 2)}, "attention_dilation has 3 entries but num_hidden_layers=2"),
        ({"attention_dilation": (1, (1, 2))}, r"attention_dilation\[1\] has 2 entries but num_attention_heads=4"),
        ({"attention_dilation": (1, (1, 2, 0, 1))}, r"attention_dilation\[1\]=\(1, 2, 0, 1\) must hold integers"),
        ({"attention_dilation": (1, 2), "scan_layers": True}, "scan_layers=True needs the same attention_dilation"),
        ({"causal_attention": "yes"}, "causal_attention='yes' must be True or False"),
        (
            {"attention_dilation": 2, "attention_implementation": "splash"},
            "attention_implementation='splash' runs only the two-sided, undilated band, but this model sets "
            "attention_dilation=2; use 'blocked'",
        ),
        (
            {"causal_attention": True, "attention_implementation": "pallas-gpu"},
            "sets causal_attention=True; use 'blocked'",
        ),
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
