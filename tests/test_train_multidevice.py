"""The same training run on 1 device, on 8 CPU devices (mesh and pmap drivers, the tokens of every
row split over a "sequence" axis), and on 2 processes (which read disjoint rows of every global batch,
and resume a 1-process checkpoint at the same example); one step of the pretraining program on a
65,536-token document split over 8 devices.

Multi-device runs happen in subprocesses: XLA_FLAGS must be set before JAX starts.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.test_train_utils import ROOT, TINY, env_with_root, write_corpus

pytestmark = pytest.mark.slow  # child processes with 8 devices and 2 processes

SCRIPT = textwrap.dedent(r"""
    import json, sys, time
    T0 = time.time()
    import jax
    import numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    import longformer_jax as lj
    from train import config as config_lib, trainer
    from train.objectives import mlm_objective

    L, B, BLOCK, V, STEPS = 64, 8, 16, 64, 5
    assert jax.device_count() == 8, jax.devices()
    mcfg = lj.LongformerConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, attention_window=8, max_position_embeddings=L + 2,
                               type_vocab_size=1, layer_norm_eps=1e-5)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        ids = rng.integers(5, V, size=(B, L)).astype(np.int32)
        ids[:, ::BLOCK] = 2
        ids[:, 0] = 0
        ids[3, 40:] = 1
        am = (ids != 1).astype(np.int32)
        gm = np.zeros((B, L), np.int32)
        gm[:, ::BLOCK] = 1
        gm *= am
        labels = np.where((rng.random((B, L)) < 0.2) & (am == 1) & (gm == 0), ids, -100).astype(np.int32)
        batches.append({"input_ids": np.where(labels >= 0, 4, ids).astype(np.int32), "attention_mask": am,
                        "global_attention_mask": gm, "labels": labels})

    def run(kind, n_dev, data=-1, fsdp=1, accum=1, dropout=False, seq=1):
        cfg = config_lib.preset("demo", max_steps=STEPS, batch_size=B // accum, grad_accum_steps=accum,
                                seq_len=L, block_size=BLOCK, model={"attention_window": 8}, learning_rate=3e-3,
                                dropout=dropout, driver=kind, mesh_data=data, mesh_fsdp=fsdp, mesh_sequence=seq)
        model = lj.LongformerForMaskedLM(mcfg if dropout else mcfg.replace(hidden_dropout_prob=0.0,
                                                                             attention_probs_dropout_prob=0.0))
        params = lj.init_params(model, 0)
        tx, sched = trainer.make_optimizer(cfg)
        drv = trainer.make_driver(cfg, model, tx, mlm_objective(L // BLOCK), sched, devices=jax.devices()[:n_dev])
        state = drv.create_state(params)
        losses = []
        for i, b in enumerate(batches):
            mb = B // accum
            micro = [{k: v[a * mb:(a + 1) * mb] for k, v in b.items()} for a in range(accum)]
            state, m = drv.train(state, trainer.stack_micro_batches(micro), jax.random.PRNGKey(100 + i))
            losses.append(float(m["loss"]))
        ev = trainer.finish_eval([jax.device_get(drv.evaluate(state, batches[0]))], drv.objective)
        final = drv.host_params(state)
        emb = final["longformer"]["embeddings"]["word_embeddings"]["embedding"]
        spec = batch_spec = None
        if kind == "mesh":
            table = state.params["longformer"]["embeddings"]["word_embeddings"]["embedding"]
            spec = list(table.sharding.spec)
            batch_spec = [list(a) if isinstance(a, tuple) else a
                          for a in drv.put_batch({"x": np.zeros((1, B, L), np.int32)}, batch_dim=1)["x"].sharding.spec]
        return {"losses": losses, "eval_loss": ev["loss"], "emb_sum": float(np.abs(emb).sum()),
                "emb_00": float(emb[5, 0]), "spec": spec, "batch_spec": batch_spec}

    out = {
        "mesh1": run("mesh", 1),
        "mesh8": run("mesh", 8),
        "mesh2x4": run("mesh", 8, data=2, fsdp=4),
        "pmap8": run("pmap", 8),
        "mesh4_accum2": run("mesh", 4, accum=2),
        "drop1": run("mesh", 1, dropout=True),
        "drop2x4": run("mesh", 8, data=2, fsdp=4, dropout=True),
        "seq8": run("mesh", 8, data=1, seq=8),
        "seq2x1x4": run("mesh", 8, data=2, seq=4),
        "fsdp2_seq4": run("mesh", 8, data=1, fsdp=2, seq=4),
        "drop_seq8": run("mesh", 8, data=1, seq=8, dropout=True),
    }
    try:
        cfg = config_lib.preset("demo", batch_size=6, seq_len=L, block_size=BLOCK, model={"attention_window": 8})
        trainer.make_driver(cfg, lj.LongformerForMaskedLM(mcfg), trainer.make_optimizer(cfg)[0], mlm_objective(4))
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    try:
        cfg = config_lib.preset("demo", batch_size=3, seq_len=L, block_size=BLOCK, model={"attention_window": 8},
                                mesh_data=-1, mesh_sequence=4)
        trainer.make_driver(cfg, lj.LongformerForMaskedLM(mcfg), trainer.make_optimizer(cfg)[0], mlm_objective(4))
        out["seq_error"] = None
    except ValueError as e:
        out["seq_error"] = str(e)
    import time; out["seconds"] = time.time() - T0
    print("RESULT " + json.dumps(out))
""")


_env = env_with_root


@pytest.fixture(scope="module")
def eight_device_results():
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("other", ["mesh8", "mesh2x4", "pmap8", "mesh4_accum2", "seq8", "seq2x1x4", "fsdp2_seq4"])
def test_same_losses_on_1_and_8_devices(eight_device_results, other):
    r = eight_device_results
    ref = r["mesh1"]
    np.testing.assert_allclose(r[other]["losses"], ref["losses"], rtol=2e-5)
    np.testing.assert_allclose(r[other]["eval_loss"], ref["eval_loss"], rtol=2e-5)
    np.testing.assert_allclose(r[other]["emb_sum"], ref["emb_sum"], rtol=1e-5)
    np.testing.assert_allclose(r[other]["emb_00"], ref["emb_00"], rtol=1e-4, atol=1e-6)
    assert ref["losses"][-1] < ref["losses"][0]


def test_fsdp_mesh_shards_parameters(eight_device_results):
    assert eight_device_results["mesh2x4"]["spec"] == [None, "fsdp"]
    assert eight_device_results["mesh8"]["spec"] in ([], [None, None])  # fsdp axis of size 1


def test_dropout_is_the_same_on_any_mesh(eight_device_results):
    r = eight_device_results
    np.testing.assert_allclose(r["drop2x4"]["losses"], r["drop1"]["losses"], rtol=2e-5)
    assert r["drop1"]["losses"] != r["mesh1"]["losses"]


def test_batch_not_divisible_by_devices_is_a_clear_error(eight_device_results):
    err = eight_device_results["error"]
    assert err and "batch_size=6 is not divisible by the 8 devices" in err and "multiple of 8" in err
    err = eight_device_results["seq_error"]
    assert err and "batch_size=3 is not divisible by the 2 data x fsdp devices" in err and "multiple of 2" in err


def test_sequence_axis_splits_the_tokens_of_every_row(eight_device_results):
    r = eight_device_results
    assert r["seq8"]["batch_spec"] == [None, ["data", "fsdp"], "sequence"]
    assert r["mesh8"]["batch_spec"] == [None, ["data", "fsdp"], None]
    assert r["fsdp2_seq4"]["spec"] == [None, "fsdp"]  # parameters stay fsdp-sharded, never split over sequence
    # With dropout each device draws its own attention masks: a run, not one device's numbers.
    drop = r["drop_seq8"]["losses"]
    assert all(np.isfinite(drop)) and drop != r["seq8"]["losses"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


MULTI_STEPS = 4


def _pretrain_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "train.pretrain",
        "--preset",
        "demo",
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--max-steps",
        str(MULTI_STEPS),
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--batch-size",
        "4",
        "--log-batch-fingerprints",
        "--no-async-checkpointing",
        *TINY,
        *extra,
    ]


def _run_processes(cmd: list[str], n: int) -> list[str]:
    """Runs `cmd` as `n` processes of one jax.distributed job (n == 1: a plain run); their stderr."""
    port = _free_port()
    procs = []
    for i in range(n):
        dist = ["--coordinator-address", f"localhost:{port}", "--num-processes", str(n), "--process-id", str(i)]
        procs.append(
            subprocess.Popen(
                [*cmd, *(dist if n > 1 else [])],
                cwd=ROOT,
                env=_env(JAX_PLATFORMS="cpu"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=400)[1])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return errs


def _rows(path: Path) -> dict[tuple[int, int], list[str]]:
    """(step, micro) -> the row fingerprints a process logged (the last record of each)."""
    return {(r["step"], r["micro"]): r["rows"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, run directory) of a 1-process run of MULTI_STEPS steps, checkpoints at 2 and 4."""
    base = tmp_path_factory.mktemp("single")
    corpus = write_corpus(base / "corpus.jsonl")
    _run_processes(_pretrain_args(corpus, base / "run"), 1)
    return corpus, base / "run"


def test_two_processes_with_jax_distributed(tmp_path, single_process_run):
    """Two processes read disjoint rows of every global batch, whose union is the 1-process run's batch."""
    corpus, single = single_process_run
    run = tmp_path / "run"
    errs = _run_processes(_pretrain_args(corpus, run), 2)
    assert "2 device(s)" in errs[0]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, MULTI_STEPS + 1))
    assert (run / "hf" / "model.safetensors").exists()
    data_files = sorted(p.name for p in (run / "checkpoints" / str(MULTI_STEPS) / "data").iterdir())
    assert "process_0-of-2.json" in data_files and "process_1-of-2.json" in data_files
    assert (
        json.loads((run / "config.json").read_text())["data_fingerprint"]
        == json.loads((single / "config.json").read_text())["data_fingerprint"]
    )
    ref = _rows(single / "batches.jsonl")
    p0, p1 = _rows(run / "batches.0-of-2.jsonl"), _rows(run / "batches.1-of-2.jsonl")
    assert sorted(ref) == sorted(p0) == sorted(p1) == [(s, 0) for s in range(MULTI_STEPS)]
    for key, rows in ref.items():
        assert len(p0[key]) == len(p1[key]) == 2 and not set(p0[key]) & set(p1[key])
        assert p0[key] + p1[key] == rows


def test_resume_from_one_process_into_two(tmp_path, single_process_run):
    """A 1-process checkpoint resumed by 2 processes continues at the same global example."""
    corpus, single = single_process_run
    run = shutil.copytree(single, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / str(MULTI_STEPS))
    shutil.rmtree(run / "hf")
    (run / "batches.jsonl").unlink()
    errs = _run_processes(_pretrain_args(corpus, run), 2)
    assert "resuming from step 2" in errs[0]
    ref = _rows(single / "batches.jsonl")
    p0, p1 = _rows(run / "batches.0-of-2.jsonl"), _rows(run / "batches.1-of-2.jsonl")
    assert sorted(p0) == sorted(p1) == [(s, 0) for s in range(2, MULTI_STEPS)]
    for key in p0:
        assert p0[key] + p1[key] == ref[key]
    losses = {}
    for name, d in (("single", single), ("resumed", run)):
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {r["step"]: r["loss"] for r in recs if r["split"] == "train"}
    for step in range(3, MULTI_STEPS + 1):
        np.testing.assert_allclose(losses["resumed"][step], losses["single"][step], rtol=1e-4)


def test_one_step_on_a_65536_token_document_over_8_devices(tmp_path):
    """The pretraining program with --mesh data=1,fsdp=1,sequence=8: one document of 65,536 tokens (blocks
    of 512 with a global token each, so global tokens on every device) split over 8 CPU devices."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=2, words=40_000)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "train.pretrain",
        "--preset",
        "demo",
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--max-steps",
        "1",
        "--save-every",
        "1",
        "--eval-every",
        "1",
        "--batch-size",
        "1",
        "--model",
        "hidden_size=32",
        "num_hidden_layers=2",
        "num_attention_heads=4",
        "intermediate_size=64",
        "attention_window=64",
        "--seq-len",
        "65536",
        "--block-size",
        "512",
        "--tokenizer-vocab-size",
        "300",
        "--min-doc-tokens",
        "50",
        "--eval-docs",
        "1",
        "--eval-batches",
        "1",
        "--no-progress-bar",
        "--mesh",
        "data=1,fsdp=1,sequence=8",
    ]
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "examples of 65536 tokens, 8 device(s) (mesh), batch 1" in p.stderr + p.stdout
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [1] and np.isfinite(train[0]["loss"]) and train[0]["grad_norm"] > 0
    evals = [r for r in recs if r["split"] == "eval"]
    assert evals and all(np.isfinite(r["loss"]) and r["count"] > 5000 for r in evals), evals  # ~15% of 65k
    assert json.loads((out / "config.json").read_text())["mesh_sequence"] == 8
    assert (out / "hf" / "model.safetensors").exists()
