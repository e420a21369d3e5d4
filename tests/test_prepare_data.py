"""Data preparation (train.prepare_data): shards and manifest, resumable and split over processes,
the same bytes whatever the split or the number of workers, and bad input refused with nothing left."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train_utils import ROOT, TINY, env_with_root, write_corpus
from train import data, prepare_data, records

SETTINGS = prepare_data.Settings(seq_len=64, block_size=16, min_doc_tokens=50, eval_docs=2)


def write_c4_like(directory: Path, n_files: int = 3, n_docs: int = 5) -> Path:
    """C4's layout: JSON lines with a `text` field in `c4-train.IIIII-of-NNNNN.json.gz` files."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = write_corpus(directory / "tmp.jsonl", n_docs=n_docs, seed=i).read_text().splitlines()
        with gzip.open(directory / f"c4-train.{i:05d}-of-{n_files:05d}.json.gz", "wt") as f:
            for line in lines:
                f.write(json.dumps({"text": json.loads(line)["text"], "url": "x", "timestamp": "t"}) + "\n")
    (directory / "tmp.jsonl").unlink()
    return directory


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_c4_like(tmp_path_factory.mktemp("c4"))


@pytest.fixture(scope="module")
def tok(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return data.train_demo_tokenizer(data.read_documents(str(source)), str(out), vocab_size=300)


@pytest.fixture(scope="module")
def reference(source, tok, tmp_path_factory) -> records.Manifest:
    return prepare_data.prepare(str(source), tok, tmp_path_factory.mktemp("ref") / "p", SETTINGS, progress=False)


def _bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".arrayrecord", ".json")}


def test_shards_manifest_and_tokenizer(reference, tok, source):
    d = reference.directory
    names = sorted(p.name for p in d.iterdir())
    assert names == [
        "eval.arrayrecord",
        "manifest.json",
        "tokenizer",
        *[f"train-{i:05d}-of-00003.{ext}" for i in range(3) for ext in ("arrayrecord", "json")],
    ]
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == records.FORMAT and m["format_version"] == records.FORMAT_VERSION
    s = m["settings"]
    assert s["record_layout"] == {
        "layout": "blocks",
        "seq_len": 64,
        "block_size": 16,
        "bos_id": 0,
        "eos_id": 2,
        "pad_id": 1,
        "dtype": "uint16",
    }
    assert s["min_doc_tokens"] == 50 and s["eval_docs"] == 2 and s["tokenizer"]["vocab_size"] == 300
    assert [u[0] for u in s["units"]] == [f"c4-train.{i:05d}-of-00003.json.gz" for i in range(3)]
    assert [sh["source"] for sh in m["shards"]] == [u[0] for u in s["units"]]  # input file i -> shard i
    assert all(sh["examples"] > 0 and sh["tokens"] > sh["examples"] for sh in m["shards"])
    assert m["shards"][0]["documents"] == 3 and m["eval"]["documents"] == 2  # 2 of unit 0's 5 held out
    assert m["totals"]["train_examples"] == sum(sh["examples"] for sh in m["shards"]) == reference.num_train
    for sh in m["shards"]:
        assert (d / sh["file"]).stat().st_size == sh["bytes"]
    # The saved tokenizer is the same tokenizer, and the manifest says so.
    saved = data.load_tokenizer(str(d / "tokenizer"))
    assert data.tokenizer_hash(saved) == data.tokenizer_hash(tok) == reference.tokenizer_hash
    assert data.open_prepared(d, saved, layout="blocks", seq_len=64, block_size=16).fingerprint == m["fingerprint"]


def test_rerun_skips_complete_shards_and_repairs_a_damaged_one(reference, source, tok, tmp_path, monkeypatch):
    import shutil

    d = shutil.copytree(reference.directory, tmp_path / "p")
    want = _bytes(d)
    calls = []
    real = prepare_data.prepare_unit
    monkeypatch.setattr(
        prepare_data, "prepare_unit", lambda unit, i, *a, **k: calls.append(i) or real(unit, i, *a, **k)
    )
    assert prepare_data.prepare(str(source), tok, d, SETTINGS, progress=False).fingerprint == reference.fingerprint
    assert calls == []  # complete: nothing redone
    shard = d / "train-00001-of-00003.arrayrecord"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="train-00001-of-00003.arrayrecord is truncated"):
        data.open_prepared(d)
    (d / "train-00002-of-00003.arrayrecord").unlink()
    assert prepare_data.prepare(str(source), tok, d, SETTINGS, progress=False).fingerprint == reference.fingerprint
    assert calls == [1, 2] and _bytes(d) == want


def test_shards_split_over_processes_equal_one_process(reference, source, tok, tmp_path, capsys):
    out = tmp_path / "p"
    assert prepare_data.prepare(str(source), tok, out, SETTINGS, num_shards=2, shard_index=1, progress=False) is None
    assert "1 of 3 shards" in capsys.readouterr().err  # shard 1 only; no manifest yet
    assert sorted(p.name for p in out.glob("*.arrayrecord")) == ["train-00001-of-00003.arrayrecord"]
    manifest = prepare_data.prepare(str(source), tok, out, SETTINGS, num_shards=2, shard_index=0, progress=False)
    assert manifest.fingerprint == reference.fingerprint and _bytes(out) == _bytes(reference.directory)


def test_hf_dataset_shards_are_the_units(tok, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    texts = [json.loads(x)["text"] for x in write_corpus(tmp_path / "c.jsonl", n_docs=6).read_text().splitlines()]
    iterable = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=3)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: iterable)
    m = prepare_data.prepare("hf:some/corpus:en", tok, tmp_path / "p", SETTINGS, progress=False)
    assert [sh["source"] for sh in m.content["shards"]] == [f"hf:some/corpus:en#shard-{i}-of-3" for i in range(3)]
    assert m.content["totals"]["documents_read"] == 6 and m.num_eval > 0


def _cli(*args) -> tuple[int, str]:
    p = subprocess.run(
        [sys.executable, "-m", "train.prepare_data", *args, "--no-progress"],
        cwd=ROOT,
        env=env_with_root(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return p.returncode, p.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "100", "--block-size", "16"], "seq_len=100 is not a multiple of block_size=16; use seq_len=96"),
        (["--num-shards", "2", "--shard-index", "2"], "--shard-index 2 is out of range for --num-shards 2"),
        (
            ["--min-doc-tokens", "100000"],
            "the corpus is empty after the length filter: 15 documents read, none with "
            "at least min_doc_tokens=100000 tokens",
        ),
        (
            ["--eval-docs", "1", "--layout", "contiguous", "--seq-len", "100000"],
            "no training example: 15 documents kept (1 of them held out by --eval-docs) make no 'contiguous' example",
        ),
    ],
    ids=["seq-len", "shard-index", "empty-after-filter", "no-example"],
)
@pytest.mark.slow
def test_bad_input_is_one_error_line_and_no_output(source, tok, tmp_path, args, message):
    out = tmp_path / "out"
    base = [
        "--data",
        str(source),
        "--tokenizer",
        tok.name_or_path,
        "--output",
        str(out),
        "--seq-len",
        "64",
        "--block-size",
        "16",
        "--min-doc-tokens",
        "50",
    ]
    rc, err = _cli(*base, *args)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()


def test_another_tokenizer_is_refused_and_the_directory_kept(reference, source, tmp_path):
    import shutil

    d = shutil.copytree(reference.directory, tmp_path / "p")
    before = _bytes(d)
    other = data.train_demo_tokenizer(data.read_documents(str(source)), str(tmp_path / "tok2"), vocab_size=290)
    with pytest.raises(
        ValueError,
        match=r"holds data prepared with other settings \(tokenizer: saved .* now .*; "
        r"choose another --output",
    ):
        prepare_data.prepare(str(source), other, d, SETTINGS, progress=False)
    with pytest.raises(ValueError, match="was made with another tokenizer"):
        data.open_prepared(d, other)
    (d / "manifest.json").unlink()  # unfinished: the shards' own records name the settings
    with pytest.raises(ValueError, match=r"other settings \(tokenizer: saved"):
        prepare_data.prepare(str(source), other, d, SETTINGS, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(min_doc_tokens: saved 50, now 60\)"):
        prepare_data.prepare(
            str(source),
            data.load_tokenizer(str(reference.directory / "tokenizer")),
            d,
            prepare_data.Settings(seq_len=64, block_size=16, min_doc_tokens=60, eval_docs=2),
            progress=False,
        )
    after = _bytes(d)
    assert all(after[k] == v for k, v in before.items() if k != "manifest.json")  # the shards untouched


@pytest.mark.slow
def test_workers_write_the_same_shards(reference, source, tok, tmp_path):
    m = prepare_data.prepare(str(source), tok, tmp_path / "p", SETTINGS, workers=2, progress=False)
    assert m.fingerprint == reference.fingerprint and _bytes(tmp_path / "p") == _bytes(reference.directory)


@pytest.mark.slow
def test_two_processes_prepare_and_training_reads_their_shards(source, tok, tmp_path):
    out = tmp_path / "p"
    cmd = [
        sys.executable,
        "-m",
        "train.prepare_data",
        "--data",
        str(source),
        "--tokenizer",
        tok.name_or_path,
        "--output",
        str(out),
        "--seq-len",
        "64",
        "--block-size",
        "16",
        "--min-doc-tokens",
        "50",
        "--eval-docs",
        "1",
        "--num-shards",
        "2",
        "--no-progress",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--shard-index", str(i)],
            cwd=ROOT,
            env=env_with_root(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    manifest = data.open_prepared(out, tok)
    assert len(manifest.content["shards"]) == 3 and manifest.num_train > 0
    run = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.pretrain",
            "--preset",
            "demo",
            *TINY,
            "--data",
            str(out),
            "--output-dir",
            str(run),
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--save-every",
            "3",
            "--eval-every",
            "100",
            "--log-batch-fingerprints",
        ],
        cwd=ROOT,
        env=env_with_root(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{manifest.num_train} train / {manifest.num_eval} eval examples" in p.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["data_fingerprint"] == manifest.fingerprint
    assert data.tokenizer_hash(data.load_tokenizer(str(run / "tokenizer"))) == manifest.tokenizer_hash
    assert not (run / "data").exists()  # a prepared --data is read in place
    rows = [r for x in (run / "batches.jsonl").read_text().splitlines() for r in json.loads(x)["rows"]]
    assert len(rows) == 12 and len(set(rows)) == min(12, manifest.num_train)  # 3 steps of 4 examples, no repeat
    assert np.isfinite([json.loads(x).get("loss", 0) for x in (run / "metrics.jsonl").read_text().splitlines()]).all()
