"""The training data loader alone: its resident memory against the corpus size, and its speed on one core.

```bash
python -m bench.data_loader                     # writes prepared directories under /tmp, prints two tables
python -m bench.data_loader --dir /tmp/x --sizes 10000 1000000 --step-ms 3058
```

1. **Memory.** Prepared directories (``train.records`` format, blocks layout) of ``--sizes``
   examples of ``--short-len`` tokens are written once under ``--dir`` (synthetic token ids: the
   loader does not look at them), each in ``--shards`` shards. For each, a fresh process builds
   ``train.data.make_train_iterator`` (global shuffle, masking, batching) and reads ``--batches``
   batches; the table gives its resident memory (VmRSS) before the iterator exists, after the
   first batch and after the last, and the peak (VmHWM). A loader that holds nothing proportional
   to the corpus shows the same figures at every size.
2. **Speed.** Examples/s of the same iterator at the seed's layout (4,096 tokens in 32 blocks of 128,
   blocks filled as sentences fill them) in a process pinned to one core, batches made on
   ``next`` (``num_threads=0``): decoding, masking and batching together. Compared with the examples/s
   a train step consumes at that layout: ``1000 / --step-ms`` (the default, 3,058 ms, is the 2-layer
   base-size train step at 4,096 tokens, window 128 + 32 globals, batch 1, of ``python -m bench.run``
   in docs/benchmarks.md; a 12-layer step takes about 6x longer, so the real ratio is larger).
3. **Preparation.** A local sample in C4's format (``c4-train.IIIII-of-NNNNN.json.gz``, JSON lines
   with a ``text`` field) made of the real text at hand: the WikiText-2 validation articles in
   ``../shared/data`` and the built-in python-docs corpus. It is not C4: its documents are longer
   than C4's typical ones, so more of them pass the 1,024-token filter. ``python -m
   train.prepare_data`` runs on it with the seed's settings (blocks of 128, 4,096 tokens,
   ``--min-doc-tokens 1024``) and a byte-level BPE of 8,192 tokens trained on the sample; the table
   gives documents/s and tokens/s, the time per million documents of this sample, and the shards'
   bytes per kept token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VOCAB = 1000


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _tokenizer(directory: Path):
    from train import corpus, data

    if data.has_tokenizer_files(directory):
        return data.load_tokenizer(str(directory))
    docs = [text for _, text in corpus.python_docs_corpus(("json", "textwrap", "argparse"))]
    return data.train_demo_tokenizer(docs, str(directory), vocab_size=VOCAB)


def write_synthetic(directory: Path, n_examples: int, *, seq_len: int, block_size: int, shards: int, tok) -> None:
    """A prepared directory of ``n_examples`` blocks-layout examples of random token ids (skipped if present)."""
    from train import prepare_data, records
    from train.corpus import SourceUnit

    if records.is_prepared(directory):
        return
    directory.mkdir(parents=True, exist_ok=True)
    settings = prepare_data.Settings(seq_len=seq_len, block_size=block_size, min_doc_tokens=0)
    units = [SourceUnit(f"synthetic-{i}", 0, lambda: iter(())) for i in range(shards)]
    content = prepare_data.settings_content(settings, tok, units)
    layout = records.RecordLayout(**content["record_layout"])
    rng = np.random.default_rng(0)
    n_blocks = seq_len // block_size
    infos = []
    for i in range(shards):
        count = n_examples // shards + (i < n_examples % shards)
        sink = prepare_data.RecordSink(directory / records.shard_name(i, shards), layout)
        lengths = rng.integers(block_size // 2, block_size, size=(count, n_blocks))
        tokens = rng.integers(5, VOCAB, size=(count, n_blocks * block_size))
        for row in range(count):
            blocks = [tokens[row, j * block_size : j * block_size + lengths[row, j]].tolist() for j in range(n_blocks)]
            sink.add([layout.encode_blocks(blocks)])
        infos.append(
            {
                "settings_hash": records.canonical_hash(content),
                "unit": i,
                "source": units[i].name,
                "documents_read": count,
                "longest_document_tokens": seq_len,
                "train": sink.commit(),
            }
        )
    prepare_data.write_manifest(directory, tok, "synthetic", settings, content, infos)


def measure(directory: Path, batches: int, batch_size: int, one_core: bool) -> dict:
    """Runs in a fresh process: memory and speed of the loader over ``directory``."""
    if one_core:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from train import data

    prepared = data.open_prepared(directory)
    tok = data.load_tokenizer(str(directory / data.TOKENIZER_DIR))
    rss_before = _status_mib("VmRSS")
    it = data.make_train_iterator(prepared, data.masking_spec(tok), data.Batching(batch_size, seed=0), num_threads=0)
    next(it)
    rss_first = _status_mib("VmRSS")
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    seconds = time.perf_counter() - t0
    return {
        "examples": prepared.num_train,
        "shards": len(prepared.train_files()),
        "mib_on_disk": prepared.content["totals"]["bytes"] / 2**20,
        "rss_before": rss_before,
        "rss_first": rss_first,
        "rss_last": _status_mib("VmRSS"),
        "peak": _status_mib("VmHWM"),
        "examples_per_s": batches * batch_size / seconds,
        "seq_len": int(batch["input_ids"].shape[1]),
    }


def _child(directory: Path, batches: int, batch_size: int, one_core: bool) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.data_loader",
        "--measure",
        str(directory),
        "--batches",
        str(batches),
        "--batch-size",
        str(batch_size),
        *(["--one-core"] if one_core else []),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        raise RuntimeError(f"measuring {directory} failed: {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def write_c4_sample(directory: Path, n_files: int = 4) -> int:
    """The sample in C4's file format; returns its number of documents (skipped if present)."""
    import gzip

    from train import corpus

    files = [directory / f"c4-train.{i:05d}-of-{n_files:05d}.json.gz" for i in range(n_files)]
    wikitext = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"
    docs = list(corpus.read_documents(str(wikitext))) if wikitext.exists() else []
    docs += list(corpus.read_documents(corpus.BUILTIN_PYTHON_DOCS))
    if all(f.exists() for f in files):
        return len(docs)
    directory.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for doc in docs[i::n_files]:
                f.write(json.dumps({"text": doc, "timestamp": "2019-04-25T00:00:00Z", "url": "local"}) + "\n")
    return len(docs)


def sample_table(root: Path, workers: list[int]) -> None:
    """Times train.prepare_data on the C4-format sample with the seed's settings (table 3)."""
    from train import corpus, data

    sample = root / "c4-sample"
    n_docs = write_c4_sample(sample)
    tok_dir = root / "sample-tokenizer"
    if not data.has_tokenizer_files(tok_dir):
        data.train_demo_tokenizer(corpus.read_documents(str(sample)), str(tok_dir), vocab_size=8192)
    in_mib = sum(f.stat().st_size for f in sample.iterdir()) / 2**20
    print(
        f"\nSample: {n_docs} documents in 4 json.gz files ({in_mib:.1f} MiB compressed), tokenizer {tok_dir}\n"
        "| workers | documents kept / read | tokens read | examples | seconds | documents/s | tokens/s "
        "| s per 1M documents | shard bytes per kept token | MiB per 1M kept tokens |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for w in workers:
        out = root / f"c4-sample-prepared-{w}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = [
            sys.executable,
            "-m",
            "train.prepare_data",
            "--data",
            str(sample),
            "--tokenizer",
            str(tok_dir),
            "--output",
            str(out),
            "--seq-len",
            "4096",
            "--block-size",
            "128",
            "--min-doc-tokens",
            "1024",
            "--workers",
            str(w),
            "--no-progress",
        ]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        t = data.open_prepared(out).content["totals"]
        per_token = t["bytes"] / t["train_tokens"]
        print(
            f"| {w} | {t['train_documents']:,} / {t['documents_read']:,} | {t['tokens_read']:,} | "
            f"{t['train_examples']:,} | {seconds:,.1f} | {t['documents_read'] / seconds:,.1f} | "
            f"{t['tokens_read'] / seconds:,.0f} | {1e6 * seconds / t['documents_read']:,.0f} | {per_token:.2f} | "
            f"{per_token * 1e6 / 2**20:,.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/longformer-jax-loader-bench", help="where the prepared data are written")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--short-len", type=int, default=64, help="tokens per example of the memory corpora")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--batches", type=int, default=2000, help="batches read in the memory measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed-examples", type=int, default=2000, help="examples of the seed-layout corpus")
    p.add_argument("--speed-batches", type=int, default=40)
    p.add_argument("--step-ms", type=float, default=3058.0, help="one train step of one 4,096-token example, in ms")
    p.add_argument(
        "--sample-workers",
        type=int,
        nargs="*",
        default=[1, 2],
        help="--workers of the preparation runs on the C4-format sample (none: skip table 3)",
    )
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.batches, args.batch_size, args.one_core)))
        return 0
    root = Path(args.dir)
    tok = _tokenizer(root / "tokenizer")
    print(
        f"| examples | tokens each | shards | on disk MiB | RSS before MiB | after 1 batch MiB | after "
        f"{args.batches} batches MiB | peak MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for n in args.sizes:
        d = root / f"short-{n}"
        t0 = time.perf_counter()
        write_synthetic(d, n, seq_len=args.short_len, block_size=16, shards=args.shards, tok=tok)
        print(f"(wrote or found {d} in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        r = _child(d, args.batches, args.batch_size, one_core=False)
        print(
            f"| {r['examples']:,} | {r['seq_len']} | {r['shards']} | {r['mib_on_disk']:,.1f} "
            f"| {r['rss_before']:,.0f} | {r['rss_first']:,.0f} | {r['rss_last']:,.0f} | {r['peak']:,.0f} |"
        )
    d = root / "seed-layout"
    write_synthetic(d, args.seed_examples, seq_len=4096, block_size=128, shards=4, tok=tok)
    r = _child(d, args.speed_batches, args.batch_size, one_core=True)
    step = 1000.0 / args.step_ms
    print(
        f"\n| layout | loader examples/s (1 core) | loader tokens/s | train step examples/s | loader / step |\n"
        f"|---|---:|---:|---:|---:|\n| 4,096 tokens, 32 blocks of 128 | {r['examples_per_s']:,.1f} | "
        f"{r['examples_per_s'] * 4096:,.0f} | {step:.3f} | **{r['examples_per_s'] / step:,.0f}x** |"
    )
    if args.sample_workers:
        sample_table(root, args.sample_workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
