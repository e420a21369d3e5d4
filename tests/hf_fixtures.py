"""Checkpoints built in the test for the conversion and I/O tests: tiny random `transformers`
Longformers and RoBERTas saved as HF directories, a byte-level BPE trained on a few KB of text, and
a way to run the convert/ programs as subprocesses. Nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from longformer_jax.pretrained import save_tokenizer  # noqa: E402
from tests.test_modeling import HF_CLASSES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300

_CORPUS = [
    "Hello I'm a fashion model.",
    "The quick brown fox jumps over the lazy dog.",
    "Long documents need long models: sliding windows and a few global tokens.",
    "RoBERTa reads 512 tokens; a Longformer reads thousands, with the same weights.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
]


def build_tokenizer(directory: Path, model_max_length: int = 512) -> Path:
    """A byte-level BPE with RoBERTa's specials (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), saved as a
    transformers RobertaTokenizer in `directory`."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _CORPUS * 40, vocab_size=VOCAB, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    raw = directory / "bpe"
    raw.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(raw))
    tok = transformers.RobertaTokenizer.from_pretrained(str(raw))
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    tok.model_max_length = model_max_length
    out = directory / "tokenizer"
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def longformer_config(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=[4, 8],
        max_position_embeddings=70,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        sep_token_id=2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        num_labels=3,
    )
    base.update(kw)
    return transformers.LongformerConfig(**base)


def _perturb(model) -> None:
    """Non-trivial biases and LayerNorms, so a swapped tensor cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def make_hf_model(task: str, directory: Path, tokenizer_dir: Path | None = None, seed: int = 0, **cfg):
    """A random transformers Longformer for `task`, saved to `directory` (with the tokenizer)."""
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[task])(longformer_config(**cfg)).eval()
    _perturb(model)
    model.save_pretrained(str(directory))
    save_tokenizer(tokenizer_dir, directory)
    return model


def make_roberta(directory: Path, tokenizer_dir: Path, *, max_position_embeddings: int = 34, seed: int = 0):
    """A random transformers RobertaForMaskedLM saved to `directory` with the tokenizer."""
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
    )
    model = transformers.RobertaForMaskedLM(cfg).eval()
    _perturb(model)
    model.save_pretrained(str(directory))
    save_tokenizer(tokenizer_dir, directory)
    return model


def run_cmd(module: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything named after DST in its parent (DST itself, or a temporary build directory)."""
    return [p.name for p in parent.iterdir() if name in p.name]


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
