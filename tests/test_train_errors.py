"""Bad input is answered with a clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_utils import ROOT, TINY, env_with_root, write_corpus
from train import pretrain


def cli(capsys, *args) -> tuple[int, str]:
    rc = pretrain.main(["--preset", "demo", *TINY, *args])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", n_docs=8)


def test_missing_data_path(tmp_path, capsys):
    rc, err = cli(capsys, "--data", str(tmp_path / "nowhere.txt"), "--output-dir", str(tmp_path / "run"))
    assert rc == 2
    assert "nowhere.txt" in err and "does not exist" in err


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = cli(capsys, "--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "run"))
    assert rc == 2
    assert "empty" in err and "error:" in err


def test_no_document_long_enough(tmp_path, capsys):
    short = write_corpus(tmp_path / "short.jsonl", n_docs=5, words=20)
    rc, err = cli(capsys, "--data", str(short), "--min-doc-words", "500", "--output-dir", str(tmp_path / "run"))
    assert rc == 2
    assert "min_doc_words=500" in err and "--min-doc-words" in err


def test_tokenizer_without_mask_token(tmp_path, capsys, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        ["some text for a tokenizer"] * 10,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(tmp_path / "tok")
    rc, err = cli(
        capsys, "--data", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--output-dir", str(tmp_path / "run")
    )
    assert rc == 2
    assert "mask token" in err and str(tmp_path / "tok") in err


@pytest.mark.slow
def test_batch_not_divisible_by_devices(tmp_path, corpus):
    cmd = [
        sys.executable,
        "-m",
        "train.pretrain",
        "--preset",
        "demo",
        *TINY,
        "--data",
        str(corpus),
        "--batch-size",
        "6",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    env = env_with_root(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "batch_size=6 is not divisible by the 8 devices" in p.stderr and "multiple of 8" in p.stderr


def test_output_dir_of_another_run_and_overwrite(tmp_path, capsys, corpus):
    out = tmp_path / "run"
    base = [
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--save-every",
        "1",
        "--eval-every",
        "100",
    ]
    rc, err = cli(capsys, *base, "--max-steps", "1")
    assert rc == 0, err
    rc, err = cli(capsys, *base, "--max-steps", "1", "--learning-rate", "0.5")
    assert rc == 2
    assert str(out) in err and "learning_rate: saved 0.001, now 0.5" in err and "--overwrite" in err
    assert "--output-dir" in err
    # Same settings: resumes (nothing left to do); --overwrite: starts over with the new settings.
    rc, err = cli(capsys, *base, "--max-steps", "1")
    assert rc == 0 and "resuming from step 1" in err
    rc, err = cli(capsys, *base, "--max-steps", "1", "--learning-rate", "0.5", "--overwrite")
    assert rc == 0 and "starting:" in err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, corpus):
    out = tmp_path / "run"
    rc, err = cli(
        capsys,
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        "6",
        "--save-every",
        "1",
        "--eval-every",
        "100",
        "--learning-rate",
        "1e30",
        "--warmup-fraction",
        "0",
        "--no-async-checkpointing",
        "--clip-norm",
        "none",
    )
    assert rc == 3, err
    assert "is not finite" in err and "last good checkpoint is step" in err
    bad_step = int(err.split("error: step ")[1].split(":")[0])
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) == bad_step - 1
    assert not (out / "hf").exists()
