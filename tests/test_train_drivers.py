"""CLI runs through the other code paths: bfloat16 compute with remat and accumulation, the pmap
driver, and a checkpoint written under one driver resumed under the other."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.test_train_utils import TINY, write_corpus
from train import pretrain


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", n_docs=8)


def cli(capsys, *args) -> tuple[int, str]:
    rc = pretrain.main(["--preset", "demo", *TINY, *args])
    return rc, capsys.readouterr().err


def train_records(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["split"] == "train"]


@pytest.mark.slow
def test_bfloat16_remat_and_accumulation(tmp_path, capsys, corpus):
    out = tmp_path / "bf16"
    rc, err = cli(
        capsys,
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--grad-accum-steps",
        "2",
        "--dtype",
        "bfloat16",
        "--remat",
        "--max-steps",
        "2",
        "--save-every",
        "2",
        "--eval-every",
        "100",
    )
    assert rc == 0, err
    assert "batch 2 x 2 accumulation" in err
    recs = train_records(out)
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["examples_seen"] == 8


@pytest.mark.slow
def test_pmap_checkpoint_resumes_under_mesh(tmp_path, capsys, corpus):
    out = tmp_path / "run"
    args = [
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--save-every",
        "1",
        "--eval-every",
        "100",
        "--no-async-checkpointing",
        "--no-dropout",  # pmap draws per-device dropout masks, so only dropout-free runs match
    ]
    rc, err = cli(capsys, *args, "--driver", "pmap")
    assert rc == 0, err
    pmap_last = train_records(out)[-1]
    shutil.rmtree(out / "checkpoints" / "3")
    shutil.rmtree(out / "hf")
    rc, err = cli(capsys, *args, "--driver", "mesh")
    assert rc == 0, err
    assert "resuming from step 2" in err and "(mesh)" in err
    mesh_last = train_records(out)[-1]
    assert mesh_last["step"] == pmap_last["step"] == 3
    assert math.isclose(mesh_last["loss"], pmap_last["loss"], rel_tol=1e-5)
    assert (out / "hf" / "model.safetensors").exists()

    # Continue from the exported HF directory: the first evaluation reproduces the last one.
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in evals if r["split"] == "eval"][-1]
    out2 = tmp_path / "from_hf"
    rc, err = cli(
        capsys,
        *args[:2],
        "--output-dir",
        str(out2),
        "--init",
        str(out / "hf"),
        *args[4:6],
        "--max-steps",
        "1",
        "--eval-every",
        "100",
        "--no-dropout",
    )
    assert rc == 0, err
    first = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()][0]
    assert first["split"] == "eval" and first["step"] == 0
    assert math.isclose(first["loss"], last_eval["loss"], rel_tol=1e-5)
    assert json.loads((out2 / "config.json").read_text())["init"] == str(out / "hf")


@pytest.mark.slow
def test_the_step_takes_any_objective_and_accumulation_is_exact():
    """A row-level objective (count: rows, not tokens) through the same train step: 2 x 2 micro-batches
    give the update of 1 x 4, and the step's loss is the objective's mean over the whole step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import longformer_jax as lj
    from longformer_jax.losses import cross_entropy_sums
    from train import config as config_lib
    from train import trainer
    from train.objectives import Objective, forward

    def sums(model, params, batch, rng, deterministic):  # classify each row from its first token's logits
        logits = forward(model, params, batch, rng, deterministic, num_global_slots=0).logits[..., 0, :]
        loss_sum, correct, _ = cross_entropy_sums(logits, batch["row_label"])
        return loss_sum, {"accuracy": correct}

    def rows(batch):
        return jnp.asarray(np.prod(batch["row_label"].shape), jnp.float32)

    objective = Objective(sums=sums, count=rows, metrics=("accuracy",))
    mcfg = lj.LongformerConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=8,
        max_position_embeddings=34,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = lj.LongformerForMaskedLM(mcfg)
    params = lj.init_params(model, 0)
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(5, 40, (4, 32)).astype(np.int32),
        "attention_mask": np.ones((4, 32), np.int32),
        "global_attention_mask": np.zeros((4, 32), np.int32),
        "row_label": np.array([3, 7, 3, 9], np.int32),
    }
    out = {}
    for accum in (1, 2):
        cfg = config_lib.preset("demo", batch_size=4 // accum, grad_accum_steps=accum, dropout=False)
        tx, _ = trainer.make_optimizer(cfg)
        drv = trainer.MeshDriver(model, tx, objective, dropout=False, devices=jax.devices()[:1])
        micro = [{k: v[a * (4 // accum) : (a + 1) * (4 // accum)] for k, v in batch.items()} for a in range(accum)]
        state, m = drv.train(drv.create_state(params), trainer.stack_micro_batches(micro), np.zeros(2, np.uint32))
        out[accum] = (m, drv.host_params(state))
    with jax.default_matmul_precision("highest"):
        ref_sum, ref_sums = sums(model, params, batch, None, True)
    m1, m2 = out[1][0], out[2][0]
    assert float(m1["count"]) == float(m2["count"]) == 4.0
    np.testing.assert_allclose(float(m1["loss"]), float(ref_sum) / 4, rtol=1e-6)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    assert float(m1["accuracy"]) == float(m2["accuracy"]) == float(ref_sums["accuracy"]) / 4
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[2][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
