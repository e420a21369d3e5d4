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
