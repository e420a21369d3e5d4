"""Bad input is answered with a clear message and a non-zero exit, never a traceback: settings, data
(raw and prepared: missing or truncated shards, another tokenizer, other data under a run's
checkpoints), and runs that go wrong."""

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
    assert rc == 1
    assert "nowhere.txt" in err and "does not exist" in err


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = cli(capsys, "--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "run"))
    assert rc == 1
    assert "empty" in err and "error:" in err


def test_no_document_long_enough(tmp_path, capsys):
    short = write_corpus(tmp_path / "short.jsonl", n_docs=5, words=20)
    rc, err = cli(capsys, "--data", str(short), "--min-doc-tokens", "5000", "--output-dir", str(tmp_path / "run"))
    assert rc == 1
    assert "empty after the length filter" in err and "min_doc_tokens=5000" in err and "--min-doc-tokens" in err
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()


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
    assert rc == 1
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
    assert p.returncode == 1, p.stderr[-3000:]
    assert "batch_size=6 is not divisible by the 8 devices" in p.stderr and "multiple of 8" in p.stderr


@pytest.mark.slow
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
    assert rc == 1
    assert str(out) in err and "learning_rate: saved 0.003, now 0.5" in err and "--overwrite" in err
    assert "--output-dir" in err
    # Same settings: resumes (nothing left to do); --overwrite: starts over with the new settings.
    rc, err = cli(capsys, *base, "--max-steps", "1")
    assert rc == 0 and "resuming from step 1" in err
    rc, err = cli(capsys, *base, "--max-steps", "1", "--learning-rate", "0.5", "--overwrite")
    assert rc == 0 and "starting:" in err


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------
# Prepared data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """(prepared directory, its tokenizer) in TINY's layout."""
    from train import data, prepare_data

    base = tmp_path_factory.mktemp("prepared")
    tok = data.train_demo_tokenizer(data.read_documents(str(corpus)), str(base / "tok"), vocab_size=300)
    rc = prepare_data.main(
        [
            "--data",
            str(corpus),
            "--tokenizer",
            str(base / "tok"),
            "--output",
            str(base / "p"),
            "--seq-len",
            "64",
            "--block-size",
            "16",
            "--min-doc-tokens",
            "50",
            "--eval-docs",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0 and len(tok) == 300
    return base / "p", base / "tok"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_prepared_data_with_a_missing_or_truncated_shard(tmp_path, capsys, prepared):
    p = _copy(prepared[0], tmp_path / "p")
    shard = p / "train-00000-of-00001.arrayrecord"
    content = shard.read_bytes()
    shard.write_bytes(content[: len(content) // 2])
    rc, err = cli(capsys, "--data", str(p), "--output-dir", str(tmp_path / "run"))
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert "train-00000-of-00001.arrayrecord is truncated" in err and "prepare it again" in err
    shard.unlink()
    rc, err = cli(capsys, "--data", str(p), "--output-dir", str(tmp_path / "run"))
    assert rc == 1 and "train-00000-of-00001.arrayrecord is missing" in err
    (p / "manifest.json").unlink()
    rc, err = cli(capsys, "--data", str(p), "--output-dir", str(tmp_path / "run"))
    assert rc == 1 and "holds no manifest.json" in err and "rerun python -m train.prepare_data" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prepared_data_of_another_tokenizer_or_layout(tmp_path, capsys, prepared, corpus):
    from train import data

    data.train_demo_tokenizer(data.read_documents(str(corpus)), str(tmp_path / "other"), vocab_size=280)
    rc, err = cli(
        capsys,
        "--data",
        str(prepared[0]),
        "--tokenizer",
        str(tmp_path / "other"),
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert rc == 1 and err.count("\n") == 1
    assert "was made with another tokenizer" in err and str(prepared[0] / "tokenizer") in err
    rc, err = cli(capsys, "--data", str(prepared[0]), "--seq-len", "128", "--output-dir", str(tmp_path / "run"))
    assert rc == 1 and "was made with --seq-len 64 (not 128)" in err


@pytest.mark.slow
def test_resume_on_other_data_is_refused_and_keeps_the_checkpoints(tmp_path, capsys, prepared):
    from train import data, prepare_data

    p = _copy(prepared[0], tmp_path / "p")
    out = tmp_path / "run"
    args = [
        "--data",
        str(p),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--save-every",
        "1",
        "--eval-every",
        "100",
    ]
    rc, err = cli(capsys, *args)
    assert rc == 0, err
    saved = sorted(str(f.relative_to(out)) for f in (out / "checkpoints").rglob("*"))
    # The same path, prepared anew from another corpus with the same tokenizer.
    import shutil

    shutil.rmtree(p)
    other = write_corpus(tmp_path / "other.jsonl", n_docs=6, seed=5)
    prepare_data.prepare(
        str(other),
        data.load_tokenizer(str(prepared[1])),
        p,
        prepare_data.Settings(seq_len=64, block_size=16, min_doc_tokens=50, eval_docs=1),
        progress=False,
    )
    rc, err = cli(capsys, *args)
    assert rc == 1 and "holds checkpoints trained on other data" in err and "--overwrite" in err
    assert sorted(str(f.relative_to(out)) for f in (out / "checkpoints").rglob("*")) == saved
