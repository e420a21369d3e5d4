"""Serving artifacts (longformer_jax.export, convert.export) and their loader (longformer_jax.serving).

One exported sequence classifier (a random tiny transformers model, buckets 32 and 64, window 8) is shared
by most tests; its outputs are checked against the PyTorch model. Every head is exported and matched in a
slow test, ONNX in another.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import longformer_jax as lj  # noqa: E402
from convert import export as export_cmd  # noqa: E402
from longformer_jax import export as lj_export  # noqa: E402
from longformer_jax import serving, text_layout  # noqa: E402
from longformer_jax.pretrained import ConversionError, load_checkpoint  # noqa: E402
from tests.hf_fixtures import REPO, VOCAB, leftovers, make_hf_model, tokenizer_dir  # noqa: E402,F401

LENGTHS = "32,64"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):  # noqa: F811
    """(HF model, export directory) of a sequence classifier exported by the program with --verify."""
    root = tmp_path_factory.mktemp("export")
    hf = make_hf_model("sequence-classification", root / "hf", tokenizer_dir)
    assert export_cmd.main([str(root / "hf"), str(root / "out"), "--lengths", LENGTHS, "--verify"]) == 0
    return hf, root / "out"


@pytest.fixture(scope="module")
def loaded(exported):
    return lj.load_exported(exported[1])


def torch_logits(hf, ids, am, gm=None):
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(am, dtype=torch.long),
            global_attention_mask=None if gm is None else torch.tensor(gm, dtype=torch.long),
        )
    return out.logits.numpy()


def rows(batch: int, length: int, seed: int = 0):
    """``batch`` rows of ``length`` tokens, row r > 0 padded at its end by 3 r tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (batch, length)).astype(np.int64)
    ids[:, 0] = 0
    am = np.ones_like(ids)
    for r in range(1, batch):
        ids[r, length - 3 * r :], am[r, length - 3 * r :] = 1, 0
    return ids, am


# ---------------------------------------------------------------------------------------- the shared artifact
@pytest.mark.parametrize("batch,length", [(1, 32), (2, 20), (3, 57)])
def test_matches_pytorch_for_any_batch_and_length(exported, loaded, batch, length):
    hf, _ = exported
    ids, am = rows(batch, length, seed=batch)
    got = loaded(ids, am)["logits"]  # automatic global attention on <s>, as HF's
    np.testing.assert_allclose(got, torch_logits(hf, ids, am), atol=1e-5, rtol=0)


def test_no_global_token_and_exactly_G(exported, loaded):
    hf, _ = exported
    ids, am = rows(2, 40)
    none = np.zeros_like(ids)
    np.testing.assert_allclose(loaded(ids, am, none)["logits"], torch_logits(hf, ids, am, none), atol=1e-5, rtol=0)
    one = none.copy()
    one[:, 5] = 1  # exactly G = 1 global token, not on <s>
    np.testing.assert_allclose(loaded(ids, am, one)["logits"], torch_logits(hf, ids, am, one), atol=1e-5, rtol=0)


def test_refuses_more_than_G_globals_and_too_long_rows(loaded):
    ids, am = rows(2, 40)
    gm = np.zeros_like(ids)
    gm[1, :2] = 1
    with pytest.raises(ValueError, match=r"row 1 has 2 global tokens.*--num-global-slots 2"):
        loaded(ids, am, gm)
    gm[1, 1], am[1, 1] = 1, 0  # a global flag on padding stays padding: one global token
    assert np.isfinite(loaded(ids, am, gm)["logits"]).all()
    with pytest.raises(ValueError, match=r"65 tokens but the largest exported length is 64.*--lengths"):
        loaded(np.zeros((1, 65), np.int32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        loaded(np.full((1, 8), VOCAB, np.int32))


def test_manifest_lists_what_a_server_needs(exported):
    _, out = exported
    m = json.loads((out / "manifest.json").read_text())
    assert (m["task"], m["buckets"], m["num_global_slots"], m["global_attention"]) == (
        "sequence-classification",
        [32, 64],
        1,
        "first-token",
    )
    assert m["platforms"] == ["cpu", "cuda", "tpu"] and m["attention_implementation"] == "blocked"
    assert m["inputs"] == {"names": list(serving.INPUT_NAMES), "dtype": "int32", "shape": ["batch", "length"]}
    assert set(m["files"]) == {"model_L32.stablehlo", "model_L64.stablehlo", "model.safetensors", "tokenizer.json"}
    for name, digest in m["files"].items():
        assert serving.sha256_of(out / name) == digest
    assert m["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"] and m["versions"]["jax"]


def test_a_fresh_process_runs_it_with_jax_and_numpy_only(exported, loaded):
    _, out = exported
    ids, am = rows(2, 30)
    want = loaded(ids, am)["logits"]
    code = (
        "import sys, json, numpy as np, longformer_jax as lj\n"
        f"m = lj.load_exported({str(out)!r})\n"
        f"ids = np.array({ids.tolist()}); am = np.array({am.tolist()})\n"
        "print(json.dumps(m(ids, am)['logits'].tolist()))\n"
        "assert 'flax' not in sys.modules and 'transformers' not in sys.modules, 'imported flax or transformers'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_allclose(np.array(json.loads(r.stdout.splitlines()[-1])), want, atol=1e-6)


def test_a_corrupted_file_is_refused(exported, tmp_path):
    _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match its sha256"):
        lj.load_exported(bad)


def test_predict_texts_and_a_missing_tokenizer(exported, loaded, tmp_path):
    hf, out = exported
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France. " * 3]
    got = loaded.predict(texts)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(out.parent / "hf"))
    for text, pred in zip(texts, got):
        ids = tok(text, truncation=True, max_length=64, return_tensors="np")["input_ids"]
        p = torch.softmax(torch.tensor(torch_logits(hf, ids, np.ones_like(ids))[0]), -1).numpy()
        assert pred["label"] == f"LABEL_{int(np.argmax(p))}"
        np.testing.assert_allclose([pred["scores"][f"LABEL_{i}"] for i in range(3)], p, atol=1e-5)
    one = loaded.predict(texts[0])
    assert one["label"] == got[0]["label"]
    np.testing.assert_allclose(list(one["scores"].values()), list(got[0]["scores"].values()), atol=1e-6)
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "tokenizer.json").unlink()
    m = json.loads((bare / "manifest.json").read_text())
    m["tokenizer"] = None
    del m["files"]["tokenizer.json"]
    (bare / "manifest.json").write_text(json.dumps(m))
    model = lj.load_exported(bare)
    assert np.isfinite(model(rows(1, 16)[0])["logits"]).all()  # the programs still run on token ids
    with pytest.raises(ValueError, match="exported without a tokenizer"):
        model.predict("a text")


# ---------------------------------------------------------------------------------------- the fine-tuning layout
@pytest.mark.parametrize("layout", ["blocks", "contiguous"])
def test_text_layout_is_the_finetuning_layout(tokenizer_dir, layout):  # noqa: F811
    """``predict`` lays a document out exactly as ``train.finetune`` did (block and contiguous layouts)."""
    import tokenizers
    import transformers

    from train import finetune_data as fd

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fast = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    settings = {"task": "document-classification", "layout": layout, "seq_len": 48, "block_size": 16}
    manifest = {
        "task": "document-classification",
        "finetuning": settings,
        "special_tokens": {"bos": 0, "eos": 2, "pad": 1},
    }
    texts = [
        "Hello I'm a fashion model. The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
        ["Long documents need long models.", "Berlin is the capital of Germany."],
    ]
    ours, _ = text_layout.TextLayout.from_manifest(manifest, largest=64).encode(fast, texts)
    encoder = fd.TaskEncoder(
        "document-classification", tok, fd.Layout(layout, 48, 16, 0, 2, 1), fd.Fields(), fd.LabelSet(("a", "b"))
    )
    theirs = encoder.encode(fd.Records([{"text": t} for t in texts], "test"), "predict", targets=False).arrays
    for key in ("input_ids", "attention_mask", "global_attention_mask"):
        np.testing.assert_array_equal(ours[key], theirs[key])


# ---------------------------------------------------------------------------------------- every head
def _inputs_for(task, config):
    ids, am, gm = lj_export.verification_inputs(task, 32, 2, config, seed=3)
    return ids, am, gm


def block_head_config(finetuning=None, **fields) -> lj.LongformerConfig:
    """The tiny model (the tokenizer's vocabulary, windows 4 / 8) with 16-token sentence blocks for the block
    heads; ``finetuning``: a fine-tuning run's layout settings."""
    extra = {"sentence_block_size": 16, **({"finetuning": finetuning} if finetuning else {})}
    return lj.LongformerConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=[4, 8],
        max_position_embeddings=70,
        type_vocab_size=1,
        num_labels=3,
        extra=extra,
        **fields,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "task",
    [
        "masked-lm",
        "token-classification",
        "question-answering",
        "multiple-choice",
        "document-classification",
        "sequential-sentence-classification",
    ],
)
def test_every_head_exports_and_matches(tmp_path, task):
    """Each head's program against PyTorch (transformers' heads) or the Flax model (the block heads)."""
    custom = task in ("document-classification", "sequential-sentence-classification")
    hf = None
    if custom:
        config = block_head_config()
        model = lj.build_model(config, task)
        params = lj.init_params(model, 1)
    else:
        hf = make_hf_model(task, tmp_path / "hf", num_labels=2 if task == "question-answering" else 3)
        config, _, params, _ = load_checkpoint(tmp_path / "hf")
        model = lj.build_model(config, task)
    embed = task == "token-classification"  # one head with the weights inside the programs
    lj_export.export_model(
        model, params, tmp_path / "out", lengths=[32], num_global_slots=4, embed_weights=embed, verify=False, log=print
    )
    assert (tmp_path / "out" / "model.safetensors").exists() != embed
    loaded = lj.load_exported(tmp_path / "out")
    ids, am, gm = _inputs_for(task, config)
    got = loaded(ids, am, gm)
    if custom:
        out = model.apply({"params": params}, ids, attention_mask=am)
        want = {"logits": np.asarray(out.logits)}
    else:
        with torch.no_grad():
            t = lambda a: None if a is None else torch.tensor(a, dtype=torch.long)  # noqa: E731
            out = hf(input_ids=t(ids), attention_mask=t(am), global_attention_mask=t(gm))
        want = {name: getattr(out, name).numpy() for name in loaded.output_names}
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.slow
def test_onnx_in_onnxruntime_matches_and_verify_refuses_a_mismatch(exported, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("jax2onnx")
    hf, out = exported
    config, task, params, _ = load_checkpoint(out.parent / "hf")
    model = lj.build_model(config, task)
    lj_export.export_model(model, params, tmp_path / "onnx", lengths=[32], onnx=True, verify=False, log=print)
    onnx_model = lj.load_exported(tmp_path / "onnx", backend="onnx")
    for batch in (1, 3):
        ids, am = rows(batch, 27, seed=batch)
        np.testing.assert_allclose(onnx_model(ids, am)["logits"], torch_logits(hf, ids, am), atol=1e-4, rtol=0)
    # Weights that are not the model's: verification fails and nothing is written.
    real = lj_export.flat_weights
    monkeypatch.setattr(lj_export, "flat_weights", lambda p: {k: v * 1.01 for k, v in real(p).items()})
    with pytest.raises(ConversionError, match="verification failed: stablehlo"):
        lj_export.export_model(model, params, tmp_path / "wrong", lengths=[32], verify=True, log=print)
    assert leftovers(tmp_path, "wrong") == []


def test_bad_options_fail_cleanly(exported, tmp_path, capsys):
    _, out = exported
    src = str(out.parent / "hf")
    assert export_cmd.main([src, str(tmp_path / "x"), "--lengths", "30"]) == 1
    assert "lengths must be positive multiples of 8" in capsys.readouterr().err
    assert export_cmd.main([src, str(tmp_path / "x"), "--num-global-slots", "0"]) == 1
    assert "needs at least one slot" in capsys.readouterr().err
    assert export_cmd.main([src, str(out)]) == 1  # exists
    assert leftovers(tmp_path, "x") == []
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        lj.load_exported(out, backend="nope")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["document-classification", "sequential-sentence-classification"])
def test_predict_agrees_with_the_finetuning_predictor(tmp_path, tokenizer_dir, task):  # noqa: F811
    """A fine-tuned model (its ``"finetuning"`` settings: blocks of 16 in 64 tokens) exported from its Flax
    checkpoint predicts what ``train.finetune``'s predictor predicts, text in, labels out."""
    from longformer_jax.pretrained import save_flax_checkpoint
    from train.finetune_eval import Predictor

    settings = {"task": task, "layout": "blocks", "seq_len": 64, "block_size": 16, "pooling": "max"}
    config = block_head_config(id2label={0: "red", 1: "green", 2: "blue"}, finetuning=settings)
    model = lj.build_model(config, task)
    save_flax_checkpoint(tmp_path / "best", config, lj.init_params(model, 2), task, tokenizer_dir)
    # The run directory: its best/ is what is exported.
    assert export_cmd.main([str(tmp_path), str(tmp_path / "out"), "--lengths", "64"]) == 0
    served = lj.load_exported(tmp_path / "out")
    if task == "document-classification":
        texts = ["Paris is the capital of France. Berlin is the capital of Germany. " * 4, "Hello I'm a fashion model."]
    else:
        texts = [["Hello I'm a fashion model.", "The quick brown fox.", "Long documents need long models."] * 2]
    got = served.predict(texts)
    want = Predictor(tmp_path / "best").classify(texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    listed = lambda s: s if isinstance(s, list) else [s]  # noqa: E731  (one score dict per block or per text)
    for g, w in zip(got, want):
        for ours, theirs in zip(listed(g["scores"]), listed(w["scores"])):
            np.testing.assert_allclose([ours[k] for k in theirs], list(theirs.values()), atol=1e-5)
