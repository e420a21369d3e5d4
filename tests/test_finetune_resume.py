"""Fine-tuning runs as programs: killed (SIGKILL) and preempted (SIGTERM) runs resume to bitwise the same model,
best model and results as an uninterrupted run; the pmap and mesh drivers agree on two devices."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.finetune_fixtures import build_base_model, finetune_args, write_task
from tests.test_train_resume import run_until_checkpoint
from tests.test_train_utils import ROOT, env_with_root

TASK = "document-classification"


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftresume")
    return root, build_base_model(root), write_task(root / "tasks", TASK)


def command(space, out: Path, *extra: str) -> list[str]:
    """Evaluations (and checkpoints) every 3 of 12 steps; dropout on unless `extra` turns it off."""
    _, base, folder = space
    args = finetune_args(
        TASK, folder, base, out, "--max-steps", "12", "--eval-every", "3", "--patience", "0", "--dropout", *extra
    )
    return [sys.executable, "-m", "train.finetune", *args]


def run_to_end(cmd, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env_with_root(**env), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def params_of(directory: Path) -> dict[str, np.ndarray]:
    from longformer_jax.pretrained import load_flax_checkpoint

    _, _, params = load_flax_checkpoint(directory)
    from flax.traverse_util import flatten_dict

    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def last_state(run: Path) -> dict[str, np.ndarray]:
    from flax.traverse_util import flatten_dict

    from train.export import restore_run_params

    _, _, params, step = restore_run_params(run)
    assert step == 12
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def results(run: Path) -> dict:
    r = json.loads((run / "eval_results.json").read_text())
    return {k: v for k, v in r.items() if k not in ("best_dir", "hf_dir", "predictions")}


@pytest.mark.slow
def test_killed_and_preempted_finetuning_resumes_exactly(space, tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_to_end(command(space, ref_dir))

    cmd = command(space, run_dir)
    p = run_until_checkpoint(cmd, run_dir / "checkpoints", 3, signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    p = run_until_checkpoint(cmd, run_dir / "checkpoints", 6, signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in err or "best step" in out, err[-2000:]
    last = run_to_end(cmd)
    assert "resuming from step" in last.stderr

    for name, ref, got in (
        ("last checkpoint", last_state(ref_dir), last_state(run_dir)),
        ("best model", params_of(ref_dir / "best"), params_of(run_dir / "best")),
    ):
        assert ref.keys() == got.keys()
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name}: {k}")
    assert results(run_dir) == results(ref_dir)
    assert (run_dir / "predictions.jsonl").read_text() == (ref_dir / "predictions.jsonl").read_text()


@pytest.mark.slow
def test_pmap_and_mesh_drivers_agree(space, tmp_path):
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    for driver in ("mesh", "pmap"):
        # No dropout: the drivers draw dropout masks per device, so only the deterministic step agrees.
        p = run_to_end(command(space, tmp_path / driver, "--driver", driver, "--max-steps", "6", "--no-dropout"), **two)
        assert "2 device(s)" in p.stderr
    mesh, pmap = params_of(tmp_path / "mesh" / "best"), params_of(tmp_path / "pmap" / "best")
    for k in mesh:
        # atol 1e-5: the key biases have no true gradient (softmax ignores them); Adam turns float noise into
        # updates of ~1e-6 that differ between the two summation orders.
        np.testing.assert_allclose(pmap[k], mesh[k], rtol=1e-5, atol=1e-5, err_msg=k)
    a, b = results(tmp_path / "mesh"), results(tmp_path / "pmap")
    assert a["best_step"] == b["best_step"]
    assert a["test"]["loss"] == pytest.approx(b["test"]["loss"], abs=1e-5)
