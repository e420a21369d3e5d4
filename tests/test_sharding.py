"""Partition rules and mesh construction (longformer_jax.sharding), without real devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import longformer_jax as lj
from longformer_jax import sharding as shd

MESH = AbstractMesh((2, 4), ("data", "fsdp"))


def tiny_params(scan_layers=False, vocab=50):
    cfg = lj.LongformerConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=8,
        max_position_embeddings=66,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        scan_layers=scan_layers,
    )
    return lj.init_params(lj.LongformerForMaskedLM(cfg), 0, abstract=True)


def specs_by_path(tree, mesh=MESH):
    specs = shd.tree_partition_specs(tree, mesh)
    return {
        shd.path_str(kp): s for kp, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    }


def test_every_param_has_a_rule_and_large_arrays_shard_over_fsdp():
    params = tiny_params()
    specs = specs_by_path(params)
    flat = {shd.path_str(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(params)}
    assert set(specs) == set(flat)
    for path, x in flat.items():
        axes = shd.logical_axes(path, len(x.shape))
        assert None not in axes, f"{path} has no partition rule"
        if x.ndim == 2:  # every embedding table and dense kernel has a hidden dim: sharded
            assert "fsdp" in specs[path], (path, specs[path])
        else:
            assert specs[path] == P(None), (path, specs[path])
    assert specs["longformer/embeddings/word_embeddings/embedding"] == P(None, "fsdp")
    assert specs["longformer/encoder/layer_0/attention/self/query_global/kernel"] == P("fsdp", None)
    assert specs["longformer/encoder/layer_1/attention/output/dense/kernel"] == P(None, "fsdp")
    assert specs["longformer/encoder/layer_1/intermediate/dense/kernel"] == P("fsdp", None)
    assert specs["longformer/encoder/layer_1/output/dense/kernel"] == P(None, "fsdp")
    assert specs["lm_head/bias"] == P(None)


def test_not_divisible_dims_are_replicated():
    mesh = AbstractMesh((1, 3), ("data", "fsdp"))  # 32 % 3 != 0
    specs = specs_by_path(tiny_params(), mesh)
    assert all(s == P(*([None] * len(s))) for s in specs.values())
    assert shd.logical_to_spec(("embed", "mlp"), (33, 64), mesh) == P("fsdp", None)


def test_scan_layers_get_a_leading_layer_axis():
    specs = specs_by_path(tiny_params(scan_layers=True))
    q = [p for p in specs if p.endswith("attention/self/query/kernel")]
    assert q and all(specs[p] == P(None, "fsdp", None) for p in q)


def test_optimizer_state_follows_the_param_rules():
    import optax

    params = tiny_params()
    opt = jax.eval_shape(optax.adamw(1e-3).init, params)
    specs = specs_by_path(opt)
    mu = [s for p, s in specs.items() if p.endswith("word_embeddings/embedding")]
    assert mu and all(s == P(None, "fsdp") for s in mu)
    assert all(s == P() for p, s in specs.items() if p.endswith("count"))


def test_batch_spec_and_divisibility_error():
    assert shd.batch_spec(3, 1) == P(None, ("data", "fsdp"), None)
    assert shd.batch_spec(3, 1, token_dim=2) == P(None, ("data", "fsdp"), "sequence")
    shd.check_batch_divisible(16, 8)
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the 8 devices.*multiple of 8"):
        shd.check_batch_divisible(12, 8)


def test_make_mesh_errors_name_the_fix():
    devs = jax.devices()[:1]
    m = shd.make_mesh(-1, 1, devices=devs)
    assert dict(m.shape) == {"data": 1, "fsdp": 1, "sequence": 1}
    assert m.axis_names == ("data", "fsdp", "sequence")
    with pytest.raises(ValueError, match="mesh fsdp=2 does not divide the 1 devices"):
        shd.make_mesh(-1, 2, devices=devs)
    with pytest.raises(ValueError, match=r"mesh sequence=2 does not divide the 1 devices.*--mesh sequence=N"):
        shd.make_mesh(-1, 1, 2, devices=devs)
    with pytest.raises(ValueError, match=r"data=2 x fsdp=1 x sequence=1 = 2 devices, but 1 are present.*data=-1"):
        shd.make_mesh(2, 1, devices=devs)
    with pytest.raises(ValueError, match=r"mesh sequence=.* must be an integer \(pass devices=... by keyword\)"):
        shd.make_mesh(-1, 1, devs)


def test_parse_mesh():
    assert shd.parse_mesh("data=2,fsdp=1,sequence=4") == {"data": 2, "fsdp": 1, "sequence": 4}
    assert shd.parse_mesh("sequence=8") == {"data": -1, "fsdp": 1, "sequence": 8}
    assert shd.parse_mesh(" fsdp=2 , data=-1 ") == {"data": -1, "fsdp": 2, "sequence": 1}
    for bad in ("seq=2", "data=two", "data", "sequence=2,model=4"):
        with pytest.raises(ValueError, match=r"expected AXIS=SIZE items.*data=2,fsdp=1,sequence=4"):
            shd.parse_mesh(bad)


def test_mesh_flag_of_the_training_programs():
    from train import config as config_lib

    base = ["--seq-len", "512", "--block-size", "128", "--model", "attention_window=64"]
    c = config_lib.parse_args(["--mesh", "data=1,fsdp=1,sequence=8", *base])
    assert (c.mesh_data, c.mesh_fsdp, c.mesh_sequence) == (1, 1, 8)
    c = config_lib.parse_args(["--mesh-fsdp", "2", "--mesh-sequence", "2"])  # the per-axis flags still work
    assert (c.mesh_data, c.mesh_fsdp, c.mesh_sequence) == (-1, 2, 2)
    assert "mesh_sequence" in config_lib.TrainConfig.RESUMABLE_CHANGES
    with pytest.raises(ValueError, match=r"seq_len=512 does not split .* 16 devices .* multiple of 16 x 64 = 1024"):
        config_lib.parse_args(["--mesh", "sequence=16", *base])
    with pytest.raises(ValueError, match=r"multiple of 8 x 128 = 1024 \(the window times its dilation\)"):
        config_lib.parse_args(["--mesh", "sequence=8", *base, "--model", "attention_dilation=2"])
    c = config_lib.parse_args(["--mesh", "sequence=4", *base, "--model", "attention_dilation=2"])
    assert c.mesh_sequence == 4 and c.model["attention_dilation"] == 2
    with pytest.raises(ValueError, match="--mesh and --mesh-data both set the mesh"):
        config_lib.parse_args(["--mesh", "sequence=2", "--mesh-data", "2", *base])
    with pytest.raises(ValueError, match="mesh_sequence=2 needs the mesh driver"):
        config_lib.parse_args(["--mesh", "sequence=2", "--driver", "pmap", *base])
    with pytest.raises(ValueError, match="expected AXIS=SIZE"):
        config_lib.parse_args(["--mesh", "sequence:2"])


def test_path_str():
    tree = {"a": {"b": [np.zeros(1), np.zeros(2)]}}
    paths = [shd.path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == ["a/b/0", "a/b/1"]
