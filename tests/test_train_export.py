"""Export of a training run (train.export): the latest or a given checkpoint step of a run
directory -> an HF directory that transformers loads with the same logits as the Flax model, or a
Flax checkpoint; bad input is one `error:` line, exit status 1 and nothing written."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

import longformer_jax as lj
from convert import flax_to_hf as flax_to_hf_cmd
from tests.test_train_utils import ROOT, TINY, env_with_root, write_corpus
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import data, export, pretrain, trainer
from train.objectives import mlm_objective

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "attention_window": 8,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as train.pretrain leaves it (config.json, model/, tokenizer/, checkpoints/ of
    scanned-layer train states at steps 3 and 7, saved by the trainer's own code); returns
    (run dir, {step: params})."""
    run = tmp_path_factory.mktemp("run")
    corpus = write_corpus(run.parent / "corpus.jsonl", n_docs=4, words=200)
    tok = data.train_demo_tokenizer(data.read_documents(str(corpus)), str(run / "tokenizer"), vocab_size=300)
    cfg = config_lib.preset("demo", model=SMALL, seq_len=64, block_size=16, scan_layers=True, output_dir=str(run))
    cfg.save(run / "config.json")
    ids = data.token_ids(tok)
    mcfg = lj.LongformerConfig(
        vocab_size=len(tok),
        max_position_embeddings=64 + ids.pad + 1,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        sep_token_id=ids.eos,
        **cfg.model_options(),
    )
    model = lj.LongformerForMaskedLM(mcfg)
    mcfg.save_pretrained(run / "model", architectures=["LongformerForMaskedLM"])
    tx, _ = trainer.make_optimizer(cfg)
    driver = trainer.MeshDriver(
        model, tx, mlm_objective(cfg.num_global_slots), dropout=False, devices=jax.devices()[:1]
    )
    ckpt = ckpt_lib.Checkpointer(run / "checkpoints", async_save=False)
    saved = {}
    for step, seed in ((3, 1), (7, 2)):
        params = jax.device_get(lj.init_params(model, seed))
        ckpt.save(step, driver.create_state(params), {"next": step}, {"step": step})
        saved[step] = params
    ckpt.close()
    assert "layer" in saved[3]["longformer"]["encoder"]  # one stacked layer tree (scan_layers)
    return run, saved


def flax_logits(config, params, ids, am, gm):
    model = lj.LongformerForMaskedLM(config.replace(scan_layers=False))
    return np.asarray(model.apply({"params": params}, ids, attention_mask=am, global_attention_mask=gm).logits)


@pytest.mark.slow
def test_export_of_a_run_dir_loads_in_transformers_with_equal_logits(run_dir, tmp_path):
    run, saved = run_dir
    logs = []
    info = export.export_run(run, tmp_path / "hf", log=logs.append)
    assert info == {"dst": str(tmp_path / "hf"), "step": 7, "task": "masked-lm", "format": "hf"}
    assert "step 7" in logs[0]
    back, loading = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.mask_token == "<mask>" and len(tok) == back.config.vocab_size

    # The exported config is the run's model/config.json; the tensors are step 7's, unstacked.
    config = lj.LongformerConfig.from_pretrained(tmp_path / "hf")
    assert config == lj.LongformerConfig.from_pretrained(run / "model")
    params = lj.params_from_state_dict(lj.state_dict_from_params(saved[7], config.replace(scan_layers=True)), config)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, len(tok), (2, 21)).astype(np.int32)
    ids[:, 0] = tok.bos_token_id
    am = np.ones_like(ids)
    am[1, 15:] = 0
    ids[1, 15:] = tok.pad_token_id
    gm = np.zeros_like(ids)
    gm[:, 0] = 1
    gm[0, 9] = 1
    with torch.no_grad():
        pt = back.eval()(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(am),
            global_attention_mask=torch.from_numpy(gm),
        ).logits.numpy()
    fx = flax_logits(config, params, ids, am, gm)
    assert np.abs(pt - fx).max() <= 1e-5
    # ... and they are not step 3's.
    other = lj.params_from_state_dict(lj.state_dict_from_params(saved[3], config.replace(scan_layers=True)), config)
    assert np.abs(flax_logits(config, other, ids, am, gm) - fx).max() > 1e-3


@pytest.mark.slow
def test_serving_export_of_a_run_dir_is_its_latest_step(run_dir, tmp_path):
    """``python -m convert.export RUN DST`` on a pretraining run: the latest step's scanned-layer weights,
    served with the run's tokenizer, give the Flax model's logits at that step (and not step 3's)."""
    from convert import export as serve_cmd

    run, saved = run_dir
    assert (
        serve_cmd.main(
            [str(run), str(tmp_path / "served"), "--lengths", "32,64", "--num-global-slots", "2", "--platforms", "cpu"]
        )
        == 0
    )
    served = lj.load_exported(tmp_path / "served")
    assert (tmp_path / "served" / "tokenizer.json").is_file()
    config = lj.LongformerConfig.from_pretrained(run / "model")
    rng = np.random.default_rng(1)
    ids = rng.integers(5, config.vocab_size, (2, 40)).astype(np.int32)
    ids[:, 0] = config.bos_token_id
    am = np.ones_like(ids)
    gm = np.zeros_like(ids)
    gm[:, 0] = 1
    got = served(ids, am, gm)["logits"]
    for step, close in ((7, True), (3, False)):
        params = lj.params_from_state_dict(
            lj.state_dict_from_params(saved[step], config.replace(scan_layers=True)), config
        )
        diff = np.abs(got - flax_logits(config, params, ids, am, gm)).max()
        assert (diff <= 1e-5) == close, (step, diff)


def test_export_of_a_given_step_as_flax_and_by_the_command(run_dir, tmp_path):
    run, saved = run_dir
    export.export_run(run, tmp_path / "flax", step=3, output_format="flax", log=lambda _: None)
    model, params = lj.load_pretrained(str(tmp_path / "flax"), task="masked-lm")
    assert type(model) is lj.LongformerForMaskedLM and "layer_1" in params["longformer"]["encoder"]
    config = lj.LongformerConfig.from_pretrained(run / "model", scan_layers=True)
    want = lj.state_dict_from_params(saved[3], config)
    got = lj.state_dict_from_params(params, model.config)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert data.has_tokenizer_files(tmp_path / "flax")

    assert export.main([str(run), str(tmp_path / "hf3"), "--step", "3"]) == 0
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "hf3" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The conversion command takes a run's step directory and writes the same tensors.
    assert flax_to_hf_cmd.main([str(run / "checkpoints" / "3"), str(tmp_path / "hf4")]) == 0
    again = load_file(str(tmp_path / "hf4" / "model.safetensors"))
    assert again.keys() == want.keys() and all(np.array_equal(again[k], want[k]) for k in want)


@pytest.mark.slow
def test_bad_inputs_are_one_error_line_and_leave_nothing(run_dir, tmp_path, capsys):
    run, _ = run_dir
    dst = tmp_path / "out"

    def error(*argv) -> str:
        assert export.main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    err = error(tmp_path / "nowhere", dst)
    assert "nowhere" in err and "does not exist" in err
    (tmp_path / "empty_run").mkdir()
    err = error(tmp_path / "empty_run", dst)
    assert "config.json" in err and "not a training run directory" in err
    err = error(run, dst, "--step", "5")
    assert "no step 5" in err and "3, 7" in err and "--step" in err
    err = error(run, dst, "--format", "onnx")
    assert "'onnx'" in err and "hf, flax" in err
    assert "--step" in error(run, dst, "--step", "last")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    err = error(run, taken)
    assert str(taken) in err and "--overwrite" in err
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run", "taken"]  # no dst, no temporary dir
    assert export.main([str(run), str(taken), "--overwrite"]) == 0
    assert (taken / "model.safetensors").is_file() and not (taken / "keep.txt").exists()

    # The same through `python -m train.export`.
    p = subprocess.run(
        [sys.executable, "-m", "train.export", str(run), str(dst), "--step", "4"],
        cwd=ROOT,
        env=env_with_root(JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "no step 4" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not dst.exists()


@pytest.mark.slow
def test_the_end_of_run_export_equals_the_export_of_its_last_checkpoint(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=8)
    out = tmp_path / "run"
    rc = pretrain.main(
        [
            "--preset",
            "demo",
            *TINY,
            "--data",
            str(corpus),
            "--output-dir",
            str(out),
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--save-every",
            "1",
            "--eval-every",
            "100",
            "--no-async-checkpointing",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    from safetensors.numpy import load_file

    final = load_file(str(out / "hf" / "model.safetensors"))
    for step, equal in ((2, True), (1, False)):
        export.export_run(out, tmp_path / f"step{step}", step=step, log=lambda _: None)
        got = load_file(str(tmp_path / f"step{step}" / "model.safetensors"))
        assert got.keys() == final.keys()
        assert all(np.array_equal(got[k], final[k]) for k in final) == equal
    assert data.has_tokenizer_files(tmp_path / "step1")
