"""Shared fixtures: tiny random `transformers` Longformers and their Flax twins (float32, exact matmuls)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from longformer_jax.startup import import_jax  # noqa: E402

jax = import_jax()  # without the aot extra's CUDA plugin start-up lines (longformer_jax.startup)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from longformer_jax import targets  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# On the host's CPU unless it has a GPU or TPU (the compilers of the aot extra are then only used to
# compile for a target, tests/test_aot.py), with the CUDA plugin's start-up lines about a missing driver left out.
targets.start_jax()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")


def tiny_hf_config(**overrides):
    import transformers

    kw = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        attention_window=[4, 8],
        max_position_embeddings=130,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        sep_token_id=2,
        num_labels=3,
    )
    kw.update(overrides)
    return transformers.LongformerConfig(**kw)


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


def max_diff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = b.detach().cpu().numpy().astype(np.float64) if hasattr(b, "detach") else np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max()) if a.size else 0.0
