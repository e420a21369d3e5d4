"""Resume: a run on prepared data (train.prepare_data) killed with SIGKILL (and later stopped with
SIGTERM), restarted with the same command, ends with the same parameters as an uninterrupted run,
and sees every batch, row by row, once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_train_utils import ROOT, TINY, env_with_root, write_corpus

STEPS = 12


def command(corpus: Path, out: Path) -> list[str]:
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
        str(STEPS),
        "--save-every",
        "3",
        "--eval-every",
        "6",
        "--batch-size",
        "4",
        "--log-batch-fingerprints",
        *TINY,
    ]


def run_to_end(cmd) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env_with_root(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def run_until_checkpoint(cmd, ckpt_dir: Path, step: int, sig: int) -> subprocess.Popen:
    """Starts `cmd`, waits until checkpoint `step` is complete, then sends `sig`."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env_with_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while not (ckpt_dir / str(step)).is_dir():
        if p.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {step}: {p.stderr.read()[-3000:]}")
        if time.time() > deadline:
            p.kill()
            raise AssertionError(f"no checkpoint {step} within the time limit")
        time.sleep(0.05)
    p.send_signal(sig)
    return p


def fingerprints(out: Path) -> list[tuple[int, int, str]]:
    recs = [json.loads(x) for x in (out / "batches.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["micro"], r["hash"] + ":" + ",".join(r["rows"])) for r in recs]


def prepared_corpus(tmp_path: Path) -> Path:
    """A corpus prepared once (in TINY's layout) that both runs read in place."""
    from train import data, prepare_data

    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=16)
    tok = data.train_demo_tokenizer(data.read_documents(str(corpus)), str(tmp_path / "tok"), vocab_size=300)
    settings = prepare_data.Settings(seq_len=64, block_size=16, min_doc_tokens=50, eval_docs=1)
    return prepare_data.prepare(str(corpus), tok, tmp_path / "prepared", settings, progress=False).directory


def final_params(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "hf" / "model.safetensors"))


@pytest.mark.slow
def test_killed_and_preempted_run_resumes_exactly(tmp_path):
    corpus = prepared_corpus(tmp_path)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_to_end(command(corpus, ref_dir))

    # SIGKILL once checkpoint 3 exists (the kill lands anywhere after it, maybe during a save).
    cmd = command(corpus, run_dir)
    p = run_until_checkpoint(cmd, run_dir / "checkpoints", 3, signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    killed_log = fingerprints(run_dir)

    # Restart with the same command; preempt it with SIGTERM after checkpoint 9: it saves and exits 0.
    p = run_until_checkpoint(cmd, run_dir / "checkpoints", 9, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    finished_early = "SIGTERM: saved step" in err
    assert finished_early or "eval loss" in err, err[-2000:]

    # And once more to the end.
    last = run_to_end(cmd)
    assert "resuming from step" in last.stderr
    assert not (run_dir / "data").exists()  # the prepared directory is read in place

    ref, got = final_params(ref_dir), final_params(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)

    # Batches: the last record of each (step, micro) equals the uninterrupted run's, every step
    # 0..STEPS-1 was trained, and each restart resumed exactly at a checkpointed step.
    ref_fp = {(s, m): h for s, m, h in fingerprints(ref_dir)}
    log = fingerprints(run_dir)
    got_fp = {(s, m): h for s, m, h in log}
    assert sorted(ref_fp) == [(s, 0) for s in range(STEPS)]
    assert got_fp == ref_fp
    for s, m, h in log:  # every batch seen, even by the killed run, is the one of that step
        assert ref_fp[(s, m)] == h
    restarts = [i for i in range(1, len(log)) if log[i][0] <= log[i - 1][0]]
    assert len(restarts) >= 1 and len(killed_log) >= 3
    for i in restarts:
        assert log[i][0] % 3 == 0 and log[i][0] <= log[i - 1][0] + 1
