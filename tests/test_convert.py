"""The convert/ programs: HF <-> Flax round trips for every head, unsafe pickles refused, clear
errors (with nothing left behind) on bad input, run directories handed to train.export.

Everything is built in the test (tiny random models, a byte-level BPE trained on a few KB of text);
nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import flax_to_hf as flax_to_hf_cmd  # noqa: E402
from convert import hf_to_flax as hf_to_flax_cmd  # noqa: E402
from convert import roberta_to_longformer as r2l_cmd  # noqa: E402
from convert.flax_to_hf import flax_to_hf  # noqa: E402
from convert.hf_to_flax import hf_to_flax  # noqa: E402
from longformer_jax import pretrained  # noqa: E402
from longformer_jax.config import LongformerConfig  # noqa: E402
from longformer_jax.roberta import roberta_to_longformer  # noqa: E402
from longformer_jax.tasks import TASKS, build_model, init_params  # noqa: E402
from tests.hf_fixtures import (  # noqa: E402,F401
    VOCAB,
    leftovers,
    longformer_config,
    make_hf_model,
    make_roberta,
    read_safetensors,
    run_cmd,
    tokenizer_dir,
)

HF_TASKS = (
    "base",
    "masked-lm",
    "sequence-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
)
CUSTOM_TASKS = ("document-classification", "sequential-sentence-classification")


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.slow
def test_round_trip_masked_lm_via_commands(tmp_path, tokenizer_dir):  # noqa: F811
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
    assert pretrained.is_flax_checkpoint(flax_dir)
    meta = json.loads((flax_dir / "longformer_jax.json").read_text())
    assert meta == {
        "format": "longformer-jax-flax",
        "task": "masked-lm",
        "version": 1,
        "settings": {
            "dtype": "float32",
            "remat": False,
            "attention_block_size": None,
            "attention_implementation": "blocked",
        },
    }
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (flax_dir / name).is_file(), name

    r = run_cmd("convert.flax_to_hf", flax_dir, tmp_path / "back")
    assert r.returncode == 0, r.stderr
    back, info = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(back).__name__ == "LongformerForMaskedLM"
    ref, got = model.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert (tmp_path / "back" / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("task", [t for t in HF_TASKS if t != "masked-lm"])
def test_round_trip_every_head(tmp_path, task):
    """Each head: HF -> Flax (command entry point, --verify) -> HF gives identical tensors."""
    src = tmp_path / "hf"
    # HF's QA head has num_labels outputs and splits them into start/end: it needs 2.
    model = make_hf_model(task, src, seed=1, num_labels=2 if task == "question-answering" else 3)
    assert hf_to_flax_cmd.main([str(src), str(tmp_path / "flax"), "--verify", "--tolerance", "1e-5"]) == 0
    config, task_read, params = pretrained.load_flax_checkpoint(tmp_path / "flax")
    assert task_read == task
    assert flax_to_hf_cmd.main([str(tmp_path / "flax"), str(tmp_path / "back")]) == 0
    auto = getattr(transformers, TASKS[task].auto_class)
    back, info = auto.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref, got = model.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("task", CUSTOM_TASKS)
def test_round_trip_custom_heads(tmp_path, task):
    """The heads with no transformers class: Flax params -> HF dir -> Flax -> HF, identical tensors."""
    d = longformer_config(attention_window=[8, 8]).to_dict()
    d["sentence_block_size"] = 8  # kept in config.json (config.extra), read by tasks.build_model
    config = LongformerConfig.from_dict(d)
    model = build_model(config, task)
    params = init_params(model, 3)
    pretrained.save_pretrained(tmp_path / "hf", model, params)
    summary = hf_to_flax(tmp_path / "hf", tmp_path / "flax", verify=True, log=lambda s: None)
    assert summary["max_abs_diff"] <= 1e-5  # the encoder against transformers' LongformerModel
    _, task_read, _ = pretrained.load_flax_checkpoint(tmp_path / "flax")
    assert task_read == task
    flax_to_hf(tmp_path / "flax", tmp_path / "back", log=lambda s: None)
    a = read_safetensors(tmp_path / "hf" / "model.safetensors")
    b = read_safetensors(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [TASKS[task].hf_architecture]


def test_bin_checkpoint_is_read(tmp_path):
    """pytorch_model.bin (a plain tensor pickle) converts like safetensors."""
    src = tmp_path / "hf"
    model = make_hf_model("masked-lm", src)
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    hf_to_flax(src, tmp_path / "flax", log=lambda s: None)
    flax_to_hf(tmp_path / "flax", tmp_path / "back", log=lambda s: None)
    # flax_to_hf also takes an HF directory directly.
    flax_to_hf(src, tmp_path / "back2", log=lambda s: None)
    for out in ("back", "back2"):
        got = read_safetensors(tmp_path / out / "model.safetensors")
        for k, v in model.state_dict().items():
            if k in got:
                np.testing.assert_array_equal(v.numpy(), got[k], err_msg=k)


def test_flax_to_hf_task_change_keeps_the_encoder(tmp_path):
    """--task base on a masked-LM checkpoint: the encoder only, no pooler made up."""
    src = tmp_path / "hf"
    model = make_hf_model("masked-lm", src)
    hf_to_flax(src, tmp_path / "flax", log=lambda s: None)
    assert flax_to_hf_cmd.main([str(tmp_path / "flax"), str(tmp_path / "base"), "--task", "base"]) == 0
    base, info = transformers.AutoModel.from_pretrained(str(tmp_path / "base"), output_loading_info=True)
    assert not info["unexpected_keys"] and all("pooler" in k for k in info["missing_keys"]), info
    got = read_safetensors(tmp_path / "base" / "model.safetensors")
    assert not any("pooler" in k for k in got)
    for k, v in model.state_dict().items():
        if k.startswith("longformer."):
            np.testing.assert_array_equal(v.numpy(), got[k[len("longformer.") :]], err_msg=k)


# ---------------------------------------------------------------------------------------- run directories
def test_flax_to_hf_hands_run_directories_to_train_export(tmp_path, monkeypatch):
    """A pretraining run directory (checkpoints/ + model/config.json), its checkpoints/ dir or a step
    dir goes to train.export.export_run; the library itself knows nothing of runs."""
    calls = []
    fake = types.ModuleType("train.export")
    fake.export_run = lambda run_dir, dst, **kw: calls.append((Path(run_dir), Path(dst), kw)) or {"dst": str(dst)}
    monkeypatch.setitem(sys.modules, "train.export", fake)
    run = tmp_path / "run"
    (run / "checkpoints" / "7").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    assert flax_to_hf_cmd.main([str(run), str(tmp_path / "a")]) == 0
    assert flax_to_hf_cmd.main([str(run / "checkpoints"), str(tmp_path / "b"), "--overwrite"]) == 0
    assert flax_to_hf_cmd.main([str(run / "checkpoints" / "7"), str(tmp_path / "c")]) == 0
    assert flax_to_hf_cmd.main([str(run), str(tmp_path / "d"), "--step", "3"]) == 0
    assert [(c[0], c[1].name, c[2]["step"], c[2]["overwrite"], c[2]["output_format"]) for c in calls] == [
        (run, "a", None, False, "hf"),
        (run, "b", None, True, "hf"),
        (run, "c", 7, False, "hf"),
        (run, "d", 3, False, "hf"),
    ]
    # --task does not apply to a run; --step only to a run.
    with pytest.raises(ValueError, match="--task does not apply"):
        flax_to_hf(run, tmp_path / "e", task="base")
    with pytest.raises(ValueError, match="--step applies to pretraining run directories"):
        flax_to_hf(tmp_path / "a", tmp_path / "f", step=1)
    assert len(calls) == 4


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
        hf_to_flax(src, tmp_path / "out2", log=lambda s: None)
    assert not marker.exists()
    assert leftovers(tmp_path, "out2") == []


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_bad_inputs_fail_cleanly(tmp_path, tokenizer_dir):  # noqa: F811
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
    transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=32,
        )
    ).save_pretrained(str(bert))
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

    # A plain RoBERTa given to hf_to_flax: pointed to the RoBERTa converter.
    r = run_cmd("convert.hf_to_flax", rob, out)
    assert r.returncode != 0 and "convert.roberta_to_longformer" in r.stderr, r.stderr

    assert leftovers(tmp_path, "dst") == []

    # An odd window, and an existing non-empty destination, are refused before any work.
    with pytest.raises(ValueError, match="even"):
        roberta_to_longformer(str(rob), 64, 7)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert r2l_cmd.main([str(rob), str(taken), "--max-length", "64"]) != 0
    assert sorted(os.listdir(taken)) == ["keep.txt"]


def test_help_of_every_command():
    # The commands' task names are the registry's.
    for cmd in (hf_to_flax_cmd, flax_to_hf_cmd):
        task_option = next(a for a in cmd.build_parser()._actions if a.dest == "task")
        assert list(task_option.choices) == list(TASKS)
    for module in ("convert.hf_to_flax", "convert.flax_to_hf", "convert.roberta_to_longformer", "convert.fill_mask"):
        mod = __import__(module, fromlist=["build_parser"])
        text = mod.build_parser().format_help()
        assert "usage:" in text and module.split(".")[1] in text
