"""Weight conversion: HF <-> Flax round trips for every head, RoBERTa -> long Longformer exactness,
unsafe pickles refused, and clear errors (with nothing left behind) on bad input.

Everything is built in the test (tiny random models, a byte-level BPE trained on a few KB of text);
nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import flax_to_hf as flax_to_hf_cmd  # noqa: E402
from convert import hf_to_flax as hf_to_flax_cmd  # noqa: E402
from convert import roberta_to_longformer as r2l_cmd  # noqa: E402
from longformer_jax import conversion, hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
HF_TASKS = ("base", "masked-lm", "sequence-classification", "token-classification", "question-answering",
            "multiple-choice")
CUSTOM_TASKS = ("document-classification", "sequential-sentence-classification")

_CORPUS = [
    "Hello I'm a fashion model.",
    "The quick brown fox jumps over the lazy dog.",
    "Long documents need long models: sliding windows and a few global tokens.",
    "RoBERTa reads 512 tokens; a Longformer reads thousands, with the same weights.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
]


# ---------------------------------------------------------------------------------------- fixtures
def build_tokenizer(directory: Path, model_max_length: int = 512) -> Path:
    """A byte-level BPE with RoBERTa's specials (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4), saved as a
    transformers RobertaTokenizer in `directory`."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 40, vocab_size=VOCAB, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    raw = directory / "bpe"
    raw.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(raw))
    tok = transformers.RobertaTokenizer.from_pretrained(str(raw))
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 4)
    tok.model_max_length = model_max_length
    out = directory / "tokenizer"
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def longformer_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, attention_window=[4, 8], max_position_embeddings=70, pad_token_id=1,
                bos_token_id=0, eos_token_id=2, sep_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5,
                num_labels=3)
    base.update(kw)
    return transformers.LongformerConfig(**base)


_TORCH_CLASSES = {
    "base": "LongformerModel",
    "masked-lm": "LongformerForMaskedLM",
    "sequence-classification": "LongformerForSequenceClassification",
    "token-classification": "LongformerForTokenClassification",
    "question-answering": "LongformerForQuestionAnswering",
    "multiple-choice": "LongformerForMultipleChoice",
}


def make_hf_model(task: str, directory: Path, tokenizer_dir: Path | None = None, seed: int = 0, **cfg):
    """A random transformers Longformer for `task`, saved to `directory` (with the tokenizer)."""
    torch.manual_seed(seed)
    model = getattr(transformers, _TORCH_CLASSES[task])(longformer_config(**cfg)).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a swapped tensor cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    if tokenizer_dir is not None:
        conversion.copy_tokenizer_files(tokenizer_dir, directory)
    return model


def run_cmd(module: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything named after DST in its parent (DST itself, or a temporary build directory)."""
    return [p.name for p in parent.iterdir() if name in p.name]


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------- round trips
def test_round_trip_masked_lm_via_commands(tmp_path, tokenizer_dir):
    """HF -> Flax -> HF with the two commands as subprocesses; identical tensors, loads with no
    missing or unexpected keys, tokenizer files carried along, --verify printed."""
    src = tmp_path / "hf"
    model = make_hf_model("masked-lm", src, tokenizer_dir)
    r = run_cmd("convert.hf_to_flax", src, tmp_path / "flax", "--verify")
    assert r.returncode == 0, r.stderr
    assert "max abs diff PyTorch vs Flax" in r.stdout
    diff = float(r.stdout.split("max abs diff PyTorch vs Flax:")[1].split()[0])
    assert diff <= 1e-5
    flax_dir = tmp_path / "flax"
    assert conversion.is_flax_checkpoint(flax_dir)
    meta = json.loads((flax_dir / "longformer_jax.json").read_text())
    assert meta == {"format": "longformer-jax-flax", "task": "masked-lm", "version": 1}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (flax_dir / name).is_file(), name

    r = run_cmd("convert.flax_to_hf", flax_dir, tmp_path / "back")
    assert r.returncode == 0, r.stderr
    back, info = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "back"),
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(back).__name__ == "LongformerForMaskedLM"
    ref, got = model.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert (tmp_path / "back" / "tokenizer.json").is_file()


@pytest.mark.parametrize("task", [t for t in HF_TASKS if t != "masked-lm"])
def test_round_trip_every_head(tmp_path, task):
    """Each head: HF -> Flax (command entry point, --verify) -> HF gives identical tensors."""
    src = tmp_path / "hf"
    # HF's QA head has num_labels outputs and splits them into start/end: it needs 2.
    model = make_hf_model(task, src, seed=1, num_labels=2 if task == "question-answering" else 3)
    assert hf_to_flax_cmd.main([str(src), str(tmp_path / "flax"), "--verify", "--tolerance", "1e-5"]) == 0
    config, task_read, params = conversion.load_flax_checkpoint(tmp_path / "flax")
    assert task_read == task
    assert flax_to_hf_cmd.main([str(tmp_path / "flax"), str(tmp_path / "back")]) == 0
    auto = getattr(transformers, conversion.TASK_TO_AUTO_CLASS[task])
    back, info = auto.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref, got = model.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("task", CUSTOM_TASKS)
def test_round_trip_custom_heads(tmp_path, task):
    """The heads with no transformers class: Flax params -> HF dir -> Flax -> HF, identical tensors."""
    from longformer_jax.config import LongformerConfig

    d = longformer_config(attention_window=[8, 8]).to_dict()
    d["sentence_block_size"] = 8  # kept in config.json (config.extra), read by hf.build_model
    config = LongformerConfig.from_dict(d)
    model = hf.build_model(config, task)
    params = hf.init_params(model, 3)
    hf.save_pretrained(tmp_path / "hf", model, params)
    summary = conversion.hf_to_flax(tmp_path / "hf", tmp_path / "flax", verify=True, log=lambda s: None)
    assert summary["max_abs_diff"] <= 1e-5  # the encoder against transformers' LongformerModel
    _, task_read, _ = conversion.load_flax_checkpoint(tmp_path / "flax")
    assert task_read == task
    conversion.flax_to_hf(tmp_path / "flax", tmp_path / "back", log=lambda s: None)
    a = read_safetensors(tmp_path / "hf" / "model.safetensors")
    b = read_safetensors(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [
        hf.HF_ARCHITECTURES[task]]


def test_flax_checkpoint_restores_sharded(tmp_path):
    """load_flax_checkpoint reads the params straight into a target sharding."""
    src = tmp_path / "hf"
    make_hf_model("masked-lm", src)
    conversion.hf_to_flax(src, tmp_path / "flax", log=lambda s: None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, _, params = conversion.load_flax_checkpoint(tmp_path / "flax", sharding=replicated)
    for leaf in jax.tree.leaves(params):
        assert leaf.sharding == replicated
    # Eight devices (a separate process: the device count is fixed when JAX starts): the word
    # embeddings split over a 4 x 2 mesh, everything else replicated.
    script = (
        "import sys, jax, numpy as np\n"
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
        "from longformer_jax import conversion\n"
        "mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'model'))\n"
        "def rule(path, shape):\n"
        "    name = '/'.join(str(getattr(k, 'key', k)) for k in path)\n"
        "    spec = P('data', 'model') if name.endswith('word_embeddings/embedding') else P()\n"
        "    return NamedSharding(mesh, spec)\n"
        "_, _, params = conversion.load_flax_checkpoint(sys.argv[1], sharding=rule)\n"
        "emb = params['longformer']['embeddings']['word_embeddings']['embedding']\n"
        "assert len(emb.sharding.device_set) == 8 and emb.addressable_shards[0].data.shape == (75, 16)\n"
        "print('ok', emb.shape)\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "flax")], cwd=REPO, capture_output=True,
                       text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                                XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert r.returncode == 0 and "ok (300, 32)" in r.stdout, r.stderr[-2000:]
    # lj.load_pretrained reads the converted directory too.
    model, params2 = hf.load_pretrained(str(tmp_path / "flax"), task="masked-lm")
    assert type(model).__name__ == "LongformerForMaskedLM"
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), params, params2)
    assert all(jax.tree.leaves(same))


def test_bin_checkpoint_is_read(tmp_path):
    """pytorch_model.bin (a plain tensor pickle) converts like safetensors."""
    src = tmp_path / "hf"
    model = make_hf_model("masked-lm", src)
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    conversion.hf_to_flax(src, tmp_path / "flax", log=lambda s: None)
    conversion.flax_to_hf(tmp_path / "flax", tmp_path / "back", log=lambda s: None)
    # flax_to_hf also takes an HF directory directly.
    conversion.flax_to_hf(src, tmp_path / "back2", log=lambda s: None)
    for out in ("back", "back2"):
        got = read_safetensors(tmp_path / out / "model.safetensors")
        for k, v in model.state_dict().items():
            if k in got:
                np.testing.assert_array_equal(v.numpy(), got[k], err_msg=k)


# ---------------------------------------------------------------------------------------- RoBERTa -> long
def make_roberta(directory: Path, tokenizer_dir: Path, *, max_position_embeddings: int = 34, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=max_position_embeddings,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                                     layer_norm_eps=1e-5)
    model = transformers.RobertaForMaskedLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    conversion.copy_tokenizer_files(tokenizer_dir, directory)
    return model


def test_roberta_to_longformer_is_exact(tmp_path, tokenizer_dir):
    """Below RoBERTa's old limit, with a window covering the whole input and no global tokens, the
    long model (HF and Flax) gives RoBERTa's outputs; above it, it runs at the new length."""
    src, dst = tmp_path / "roberta", tmp_path / "long"
    roberta = make_roberta(src, tokenizer_dir)  # old limit: 34 - 2 = 32 tokens
    max_length = 128
    assert r2l_cmd.main([str(src), str(dst), "--max-length", str(max_length), "--attention-window", "64",
                         "--format", "both"]) == 0

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

    model, params = hf.load_pretrained(str(dst), task="masked-lm")  # the Flax checkpoint in the same dir
    assert conversion.is_flax_checkpoint(dst)
    with jax.default_matmul_precision("highest"):
        got_fx = np.asarray(model.apply({"params": params}, ids.astype(np.int32),
                                        attention_mask=attn.astype(np.int32),
                                        global_attention_mask=np.zeros_like(ids, np.int32)).logits)
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
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=514, type_vocab_size=1)
    sd = {k: v.numpy() for k, v in transformers.RobertaForMaskedLM(cfg).state_dict().items()}
    sd["roberta.pooler.dense.weight"] = np.zeros((8, 8), np.float32)  # as roberta-base ships
    sd["roberta.pooler.dense.bias"] = np.zeros((8,), np.float32)
    lf_cfg, out, task = conversion.roberta_to_longformer(sd, max_length, 128, config=cfg)
    assert not any("pooler" in k for k in out)
    assert task == "masked-lm"
    assert lf_cfg["max_position_embeddings"] == max_length + 3
    pos = out["longformer.embeddings.position_embeddings.weight"]
    old = sd["roberta.embeddings.position_embeddings.weight"]
    assert pos.shape == (max_length + 3, 8)
    repeats = max_length // 512
    np.testing.assert_array_equal(pos[2:2 + 512 * repeats].reshape(repeats, 512, 8),
                                  np.broadcast_to(old[2:], (repeats, 512, 8)))
    assert "lm_head.decoder.weight" not in out and "lm_head.bias" in out
    assert not any(k.startswith("roberta.") or k.endswith("position_ids") for k in out)


def test_roberta_bare_model_keys(tmp_path):
    """A bare RobertaModel (no prefix, with pooler) becomes a base Longformer with a pooler."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=34, type_vocab_size=1)
    sd = {k: v.numpy() for k, v in transformers.RobertaModel(cfg).state_dict().items()}
    lf_cfg, out, task = conversion.roberta_to_longformer(sd, 64, 16, config=cfg)
    assert task == "base" and lf_cfg["architectures"] == ["LongformerModel"]
    assert "longformer.pooler.dense.weight" in out


# ---------------------------------------------------------------------------------------- safety
class _Payload:
    """Unpickling this calls pathlib.Path.touch(marker): code run by a pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_bin_is_refused(tmp_path):
    src = tmp_path / "hf"
    model = make_hf_model("masked-lm", src)
    (src / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    state = dict(model.state_dict())
    state["lm_head.bias"] = _Payload(str(marker))
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump(state, f)  # plain pickle: torch.load still opens it (legacy format)
    # Sanity: an unrestricted unpickler would run the payload.
    assert not marker.exists()
    r = run_cmd("convert.hf_to_flax", src, tmp_path / "out")
    assert r.returncode != 0
    assert "refus" in r.stderr.lower() and "pytorch_model.bin" in r.stderr, r.stderr
    assert not marker.exists()
    assert leftovers(tmp_path, "out") == []
    # The torch.save (zip) form of the same payload is refused too, in-process.
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        conversion.hf_to_flax(src, tmp_path / "out2", log=lambda s: None)
    assert not marker.exists()
    assert leftovers(tmp_path, "out2") == []


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_cleanly(tmp_path, tokenizer_dir):
    """Each bad input: exit code != 0, one clear message naming the file or key, no DST left."""
    out = tmp_path / "dst"

    r = run_cmd("convert.hf_to_flax", tmp_path / "missing", out)
    assert r.returncode != 0 and "missing" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(longformer_config().to_json_string())
    r = run_cmd("convert.hf_to_flax", empty, out)
    assert r.returncode != 0 and "no weights" in r.stderr and str(empty) in r.stderr, r.stderr

    bert = tmp_path / "bert"
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=32)).save_pretrained(str(bert))
    r = run_cmd("convert.roberta_to_longformer", bert, out, "--max-length", "64", "--attention-window", "8")
    assert r.returncode != 0 and "'bert'" in r.stderr and "config.json" in r.stderr, r.stderr
    r = run_cmd("convert.hf_to_flax", bert, out)
    assert r.returncode != 0 and "'bert'" in r.stderr and "model_type" in r.stderr, r.stderr

    # Mismatched shapes: config.json says intermediate_size 128, the weights have 64.
    bad = tmp_path / "bad_shape"
    make_hf_model("masked-lm", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_cmd("convert.hf_to_flax", bad, out)
    assert r.returncode != 0 and "intermediate.dense.weight" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    # RoBERTa with a wrong shape: the key and the file are named.
    rob = tmp_path / "roberta"
    make_roberta(rob, tokenizer_dir)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(rob / "model.safetensors"))
    sd["roberta.encoder.layer.1.output.dense.weight"] = torch.zeros(32, 48)
    save_file(sd, str(rob / "model.safetensors"), metadata={"format": "pt"})
    r = run_cmd("convert.roberta_to_longformer", rob, out, "--max-length", "64", "--attention-window", "8")
    assert r.returncode != 0 and "layer.1.output.dense.weight" in r.stderr, r.stderr
    assert "model.safetensors" in r.stderr

    assert leftovers(tmp_path, "dst") == []

    # An odd window, and an existing non-empty destination, are refused before any work.
    with pytest.raises(ValueError, match="even"):
        conversion.roberta_to_longformer(str(rob), 64, 7)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert r2l_cmd.main([str(rob), str(taken), "--max-length", "64"]) != 0
    assert sorted(os.listdir(taken)) == ["keep.txt"]


def test_help_of_every_command():
    # The commands' task names are the library's.
    assert conversion.TASK_TO_ARCHITECTURE == hf.HF_ARCHITECTURES
    for module in ("convert.hf_to_flax", "convert.flax_to_hf", "convert.roberta_to_longformer",
                   "convert.fill_mask"):
        mod = __import__(module, fromlist=["build_parser"])
        text = mod.build_parser().format_help()
        assert "usage:" in text and module.split(".")[1] in text
