"""fill-mask: the same top-k tokens and scores as transformers' pipeline on the PyTorch model."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert.hf_to_flax import hf_to_flax  # noqa: E402
from longformer_jax.pipeline import FillMaskPipeline, _bucket_length, fill_mask  # noqa: E402
from longformer_jax.pretrained import load_pretrained  # noqa: E402
from tests.hf_fixtures import make_hf_model, run_cmd, tokenizer_dir  # noqa: E402,F401

MAX_POS = 70  # longest input: 70 - 1 - 1 = 68 tokens


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, tokenizer_dir):  # noqa: F811
    """A tiny random LongformerForMaskedLM whose predictions are well separated (a spread-out output
    bias), saved with its tokenizer."""
    d = tmp_path_factory.mktemp("mlm")
    model = make_hf_model("masked-lm", d / "hf", tokenizer_dir, seed=3, max_position_embeddings=MAX_POS)
    with torch.no_grad():
        model.lm_head.bias.copy_(3.0 * torch.randn_like(model.lm_head.bias))
    model.save_pretrained(str(d / "hf"))
    return d / "hf"


@pytest.fixture(scope="module")
def pt(mlm_dir):
    model = transformers.LongformerForMaskedLM.from_pretrained(str(mlm_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(mlm_dir))
    return model, tok


@pytest.fixture(scope="module")
def pipe(mlm_dir):
    model, params = load_pretrained(str(mlm_dir), task="masked-lm")
    return FillMaskPipeline(model, params, str(mlm_dir))


def assert_same(ours, theirs, atol=1e-5):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a["token"] == b["token"] and a["token_str"] == b["token_str"], (a, b)
        assert a["sequence"] == b["sequence"], (a, b)
        assert abs(a["score"] - b["score"]) <= atol, (a, b)


def test_matches_transformers_pipeline(pipe, pt):
    """No global tokens (what transformers' pipeline runs): same top-k, scores within 1e-5."""
    ref = transformers.pipeline("fill-mask", model=pt[0], tokenizer=pt[1])
    text = "Hello I'm a <mask> model."
    theirs = ref(text, top_k=5)
    ours = pipe(text, top_k=5, global_attention=[])
    assert_same(ours, theirs)
    assert set(ours[0]) == {"score", "token", "token_str", "sequence"}
    # Several masks, and a batch of texts of different lengths (padded into one bucket).
    texts = ["The quick brown <mask> jumps over the <mask> dog.", "Paris is the <mask> of France."]
    ours = pipe(texts, top_k=3, global_attention=[])
    for text, got in zip(texts, ours, strict=True):
        want = ref(text, top_k=3)
        if text.count("<mask>") == 1:
            assert_same(got, want)
        else:
            for g, w in zip(got, want, strict=True):
                assert_same(g, w)


def _reference_topk(pt, text, k, global_positions):
    model, tok = pt
    enc = tok(text, return_tensors="pt")
    glob = torch.zeros_like(enc["input_ids"])
    glob[0, global_positions] = 1
    with torch.no_grad():
        logits = model(**enc, global_attention_mask=glob).logits[0]
    pos = int((enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0])
    probs = logits[pos].softmax(-1)
    values, idx = probs.topk(k)
    return values.numpy(), idx.numpy()


@pytest.mark.slow
def test_global_attention_default_and_long_text(pipe, pt):
    """Default global attention on <s>, explicit positions, and a text at the model's full length."""
    text = "Long documents need long <mask>: sliding windows and a few global tokens."
    values, idx = _reference_topk(pt, text, 4, [0])
    got = pipe(text, top_k=4)  # default: <s> global
    assert [g["token"] for g in got] == idx.tolist()
    np.testing.assert_allclose([g["score"] for g in got], values, atol=1e-5)

    values, idx = _reference_topk(pt, text, 4, [0, 3, -2])
    got = pipe(text, top_k=4, global_attention=[0, 3, -2])
    assert [g["token"] for g in got] == idx.tolist()
    np.testing.assert_allclose([g["score"] for g in got], values, atol=1e-5)

    tok = pt[1]
    long_text = "Paris is the capital of France."
    while len(tok(long_text + " Berlin <mask>")["input_ids"]) <= MAX_POS - 2:
        long_text += " Berlin"
    long_text += " <mask>"
    n = len(tok(long_text)["input_ids"])
    assert MAX_POS - 6 <= n <= MAX_POS - 2, n  # at the model's limit (68 tokens)
    values, idx = _reference_topk(pt, long_text, 3, [0])
    got = pipe(long_text, top_k=3)
    assert [g["token"] for g in got] == idx.tolist()
    np.testing.assert_allclose([g["score"] for g in got], values, atol=1e-5)


def test_one_compile_per_bucket(pipe):
    texts = [
        "Paris is the <mask> of France.",
        "Paris is the <mask> of France. Berlin is",
        "Paris is the <mask> of France. Berlin is the capital",
    ]
    lengths = [len(pipe.tokenizer(t)["input_ids"]) for t in texts]
    assert len(set(lengths)) == 3 and {_bucket_length(n, 8, 68) for n in lengths} == {32}, lengths
    pipe(texts[0], top_k=2)
    before = pipe._fn._cache_size()
    for t in texts[1:]:
        pipe(t, top_k=2)
    assert pipe._fn._cache_size() == before


def test_errors(pipe):
    with pytest.raises(ValueError, match="no mask token"):
        pipe("no mask here")
    with pytest.raises(ValueError, match="at most 68"):
        pipe("Paris " * 80 + "<mask>")
    with pytest.raises(ValueError, match="outside the input"):
        pipe("a <mask>", global_attention=[50])


def test_bucket_lengths():
    assert _bucket_length(3, 8, 68) == 8
    assert _bucket_length(9, 8, 68) == 16
    assert _bucket_length(33, 8, 68) == 64
    assert _bucket_length(65, 8, 68) == 68  # capped at the limit
    assert _bucket_length(4096, 128, 4096) == 4096


@pytest.mark.slow
def test_fill_mask_function_and_command(mlm_dir, pt, tmp_path):
    """lj.fill_mask on an HF dir and on a converted Flax checkpoint; the command prints the same."""
    ref = transformers.pipeline("fill-mask", model=pt[0], tokenizer=pt[1])
    ref = ref("Hello I'm a <mask> model.", top_k=3)
    assert_same(fill_mask(str(mlm_dir), "Hello I'm a <mask> model.", top_k=3, global_attention=[]), ref)
    hf_to_flax(mlm_dir, tmp_path / "flax", log=lambda s: None)
    assert_same(fill_mask(str(tmp_path / "flax"), "Hello I'm a <mask> model.", top_k=3, global_attention=[]), ref)
    r = run_cmd(
        "convert.fill_mask",
        tmp_path / "flax",
        "Hello I'm a <mask> model.",
        "--top-k",
        "3",
        "--global",
        "none",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert_same(json.loads(r.stdout), ref)
    r = run_cmd("convert.fill_mask", tmp_path / "flax", "no mask")
    assert r.returncode != 0 and "no mask token" in r.stderr


def test_fill_mask_on_a_directory_without_a_tokenizer_says_so(mlm_dir, pt, tmp_path):
    """A model saved without its tokenizer: a ValueError naming the fix (not empty token strings);
    with tokenizer= given, the same answers as on the directory that has one."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((mlm_dir / name).read_bytes())
    with pytest.raises(ValueError, match=r"no tokenizer files.*Pass tokenizer="):
        fill_mask(str(bare), "Hello I'm a <mask> model.", top_k=3)
    got = fill_mask(str(bare), "Hello I'm a <mask> model.", top_k=3, tokenizer=str(mlm_dir), global_attention=[])
    assert_same(got, fill_mask(str(mlm_dir), "Hello I'm a <mask> model.", top_k=3, global_attention=[]))
