r"""Data preparation: a corpus in, prepared shards out (``train.records``), once, in parallel, resumable.

```bash
python -m train.prepare_data --data SRC --tokenizer TOK --output DIR \
    [--layout blocks|contiguous] [--seq-len 4096] [--block-size 128] [--min-doc-tokens 1024] \
    [--eval-docs N] [--num-shards N --shard-index I] [--workers K]
```

SRC is what ``train.corpus`` reads: ``.txt`` / ``.jsonl(.gz)`` / C4's ``.json.gz`` / ``.parquet``
files or directories, ``hf:NAME[:CONFIG]`` (streamed) or ``builtin:python-docs``. Input unit
``i`` (file ``i`` in sorted order, or shard ``i`` of a streamed dataset) always becomes output
shard ``i``: ``--num-shards N --shard-index I`` makes this process do the units ``i`` with
``i % N == I``, so N machines split the work and any split gives the same files. Each document
is tokenized whole (its length decides the ``--min-doc-tokens`` filter), then laid out
(``train.layout``; the blocks layout splits the sentences and tokenizes each); ``--workers K``
does that in K processes, in document order. The first ``--eval-docs`` kept documents of unit 0
are held out into ``eval.arrayrecord``.

Each shard is written under a temporary name and renamed when complete, then its counts are
written beside it; a rerun skips complete shards. The process that completes the last shard
writes ``tokenizer/`` and ``manifest.json``. The training program prepares a raw-text ``--data``
into its run directory with the same ``prepare`` function.

Bad input (a missing corpus, ``--seq-len`` not a multiple of ``--block-size``, a shard index out
of range, a directory prepared with other settings or another tokenizer, a corpus empty after the
length filter) is one ``error:`` line and exit status 1, with no partial output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from train import records
from train.corpus import SourceUnit, source_units
from train.layout import ContiguousStream, check_layout, document_blocks, sentence_ids
from train.tokenizer import encode, load_tokenizer, token_ids, tokenizer_hash

DEFAULT_MIN_DOC_TOKENS = 1024  # the seed's card: documents longer than 1,024 subword tokens
CHUNK_DOCS = 16  # documents per task handed to a worker


@dataclasses.dataclass(frozen=True)
class Settings:
    """What decides the prepared examples (besides the corpus and the tokenizer).

    Attributes:
      layout: ``"blocks"`` or ``"contiguous"`` (``train.layout``).
      seq_len: example length; a multiple of ``block_size`` for ``"blocks"``.
      block_size: tokens per block, block start included (``"blocks"``).
      min_doc_tokens: documents with fewer subword tokens (the whole document, tokenized without
        special tokens) are dropped.
      eval_docs: the first this many kept documents of input unit 0 go to the evaluation file.
      min_blocks: ``"blocks"``: an example with fewer blocks (a document's last) is dropped.
      text_field: the field of ``.jsonl`` / ``.parquet`` / ``hf:`` rows holding the text.
    """

    layout: str = "blocks"
    seq_len: int = 4096
    block_size: int = 128
    min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS
    eval_docs: int = 0
    min_blocks: int = 1
    text_field: str = "text"

    def validate(self) -> None:
        check_layout(self.layout, self.seq_len, self.block_size, self.min_blocks)
        if self.min_doc_tokens < 0:
            raise ValueError(f"min_doc_tokens={self.min_doc_tokens} must be >= 0 (--min-doc-tokens)")
        if self.eval_docs < 0:
            raise ValueError(f"eval_docs={self.eval_docs} must be >= 0 (--eval-docs)")


def check_shard_args(num_shards: int, shard_index: int) -> None:
    if num_shards < 1:
        raise ValueError(f"--num-shards {num_shards} must be at least 1")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"--shard-index {shard_index} is out of range for --num-shards {num_shards}; "
            f"use an index in 0..{num_shards - 1}"
        )


# ----------------------------------------------------------------------------------------------
# Documents -> records (in this process or in workers)


class DocumentEncoder:
    """Tokenizes and lays out documents: ``__call__(docs)`` -> one result per document, in order.

    A result is ``(tokens, payload)``: the document's length in subword tokens and, when it is
    kept, its records (blocks layout: a list of ``bytes``) or its token ids (contiguous layout,
    cut into records by the caller, since examples span documents); ``None`` when dropped.
    """

    def __init__(self, tok: Any, settings: Settings, layout: records.RecordLayout):
        self.tok, self.settings, self.layout = tok, settings, layout

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return encode(self.tok, texts)

    def __call__(self, docs: list[str]) -> list[tuple[int, Any]]:
        s = self.settings
        out: list[tuple[int, Any]] = []
        for doc, ids in zip(docs, self._encode(docs), strict=True):
            if len(ids) < s.min_doc_tokens:
                out.append((len(ids), None))
            elif s.layout == "contiguous":
                out.append((len(ids), ids))
            else:
                examples = document_blocks(
                    sentence_ids(doc, self._encode), seq_len=s.seq_len, block_size=s.block_size, min_blocks=s.min_blocks
                )
                out.append((len(ids), [self.layout.encode_blocks(blocks) for blocks in examples]))
        return out


_WORKER_ENCODER: DocumentEncoder | None = None


def _init_worker(encoder: DocumentEncoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(docs: list[str]) -> list[tuple[int, Any]]:
    return _WORKER_ENCODER(docs)


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def worker_pool(encoder: DocumentEncoder, workers: int) -> Iterator[Any]:
    """``workers`` processes running ``encoder`` (None for ``workers <= 1``: encode in this process)."""
    if workers <= 1:
        yield None
        return
    # Spawned (not forked) workers: the caller may hold threads (JAX, the Rust tokenizer's pool).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(encoder,)) as pool:
        yield pool


def encoded_documents(docs: Iterable[str], encoder: DocumentEncoder, pool: Any = None) -> Iterator[tuple[int, Any]]:
    """``encoder``'s result for every document, in order: in this process, or by ``pool`` (``worker_pool``)."""
    if pool is None:
        for chunk in _chunks(docs, CHUNK_DOCS):
            yield from encoder(chunk)
        return
    for results in pool.imap(_encode_in_worker, _chunks(docs, CHUNK_DOCS), chunksize=4):
        yield from results


# ----------------------------------------------------------------------------------------------
# One shard


@dataclasses.dataclass
class Counts:
    """What one output file received."""

    examples: int = 0
    tokens: int = 0  # content tokens: no block starts, no padding
    documents: int = 0  # kept documents

    def to_json(self, file: str, size: int) -> dict[str, Any]:
        return {
            "file": file,
            "examples": self.examples,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": size,
        }


class RecordSink:
    """One output file being written: records of kept documents (contiguous: cut from a stream)."""

    def __init__(self, path: Path, layout: records.RecordLayout):
        self.writer, self.layout, self.counts = records.RecordWriter(path), layout, Counts()
        self.stream = ContiguousStream(seq_len=layout.seq_len, eos_id=layout.eos_id)

    def add(self, payload: Any) -> None:
        self.counts.documents += 1
        if self.layout.layout == "contiguous":
            payload = [self.layout.encode_contiguous(chunk) for chunk in self.stream.add(payload)]
        for record in payload:
            self.writer.write(record)
            self.counts.examples += 1
            self.counts.tokens += self.layout.content_tokens(record)

    def commit(self) -> dict[str, Any]:
        return self.counts.to_json(self.writer.path.name, self.writer.commit())


class _Progress:
    """A tqdm bar over documents with tokens/s beside documents/s (stderr)."""

    def __init__(self, enabled: bool, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit=" docs", disable=not enabled, dynamic_ncols=True, file=sys.stderr)
        self.tokens, self.t0, self.last = 0, time.perf_counter(), 0.0

    def update(self, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(1)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.t0, 1e-9):,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def prepare_unit(
    unit: SourceUnit,
    index: int,
    count: int,
    output: Path,
    encoder: DocumentEncoder,
    *,
    settings: dict[str, Any],
    pool: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes output shard ``index`` (and, for unit 0, the evaluation file); returns its counts."""
    layout, eval_docs = encoder.layout, encoder.settings.eval_docs if index == 0 else 0
    sinks = {"train": RecordSink(output / records.shard_name(index, count), layout)}
    if eval_docs:
        sinks["eval"] = RecordSink(output / records.EVAL_FILE, layout)
    bar = _Progress(progress, f"shard {index + 1}/{count}")
    read = longest = tokens_read = 0
    try:
        for n_tokens, payload in encoded_documents(unit.read(), encoder, pool):
            read += 1
            tokens_read += n_tokens
            longest = max(longest, n_tokens)
            if payload is not None:
                eval_sink = sinks.get("eval")
                held_out = eval_sink is not None and eval_sink.counts.documents < eval_docs
                (eval_sink if held_out else sinks["train"]).add(payload)
            bar.update(n_tokens)
        info = {
            "settings_hash": records.canonical_hash(settings),
            "unit": index,
            "source": unit.name,
            "settings": {k: v for k, v in settings.items() if k != "units"},
            "documents_read": read,
            "tokens_read": tokens_read,
            "longest_document_tokens": longest,
            **{name: sink.commit() for name, sink in sinks.items()},
        }
    except BaseException:
        for sink in sinks.values():
            sink.writer.abort()
        raise
    finally:
        bar.close()
    records.write_json_atomic(output / records.shard_info_name(index, count), info)
    return info


# ----------------------------------------------------------------------------------------------
# The directory


def settings_content(settings: Settings, tok: Any, units: list[SourceUnit]) -> dict[str, Any]:
    """The manifest's ``settings``: everything that decides the prepared content."""
    ids = token_ids(tok)
    layout = records.RecordLayout(
        layout=settings.layout,
        seq_len=settings.seq_len,
        block_size=settings.block_size,
        bos_id=ids.bos,
        eos_id=ids.eos,
        pad_id=ids.pad,
        dtype=records.token_dtype(ids.vocab_size, settings.seq_len, settings.block_size),
    )
    return {
        "tokenizer": {"sha256": tokenizer_hash(tok), "vocab_size": ids.vocab_size, "mask_id": ids.mask},
        "record_layout": layout.to_json(),
        "min_doc_tokens": settings.min_doc_tokens,
        "min_blocks": settings.min_blocks,
        "eval_docs": settings.eval_docs,
        "text_field": settings.text_field,
        "units": [[u.name, u.size] for u in units],
    }


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(now))
    shown = [
        f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
        for k in keys
        if k not in ("units", "tokenizer") and saved.get(k) != now.get(k)
    ]
    if saved.get("tokenizer", {}).get("sha256") != now.get("tokenizer", {}).get("sha256"):
        shown.append(
            f"tokenizer: saved sha256 {saved.get('tokenizer', {}).get('sha256', '?')[:12]}, now sha256 "
            f"{now['tokenizer']['sha256'][:12]}"
        )
    if saved.get("units") != now.get("units") and (saved.get("units") is not None or not shown):
        shown.append("the input files or their sizes")
    return "; ".join(shown)


def _other_settings_error(output: Path, saved: dict[str, Any], now: dict[str, Any]) -> ValueError:
    return ValueError(
        f"{output} holds data prepared with other settings ({_differences(saved, now)}); "
        "choose another --output, or delete it to prepare anew"
    )


def _complete_shard(
    output: Path, index: int, count: int, settings_hash: str, settings: dict[str, Any]
) -> dict[str, Any] | None:
    """The counts of shard ``index`` if it is complete (an error if made with other settings)."""
    info_path = output / records.shard_info_name(index, count)
    if not info_path.is_file():
        return None
    info = records.read_json(info_path)
    if info.get("settings_hash") != settings_hash:
        raise _other_settings_error(output, {"units": None, **info.get("settings", {})}, settings)
    files = [info["train"], *([info["eval"]] if "eval" in info else [])]
    if all((output / f["file"]).is_file() and (output / f["file"]).stat().st_size == f["bytes"] for f in files):
        return info
    info_path.unlink()  # a shard damaged since: prepare it again
    return None


class EmptyCorpusError(ValueError):
    """The corpus makes no training example (the length filter left nothing, or too little)."""


def _empty_corpus_error(infos: list[dict[str, Any]], settings: Settings) -> EmptyCorpusError:
    read = sum(i["documents_read"] for i in infos)
    kept = sum(i["train"]["documents"] + i.get("eval", {}).get("documents", 0) for i in infos)
    longest = max((i["longest_document_tokens"] for i in infos), default=0)
    if kept == 0:
        return EmptyCorpusError(
            f"the corpus is empty after the length filter: {read} documents read, none with at least "
            f"min_doc_tokens={settings.min_doc_tokens} tokens (the longest has {longest}); lower --min-doc-tokens "
            "or use a corpus of longer documents"
        )
    held_out = sum(i.get("eval", {}).get("documents", 0) for i in infos)
    return EmptyCorpusError(
        f"no training example: {kept} documents kept ({held_out} of them held out by --eval-docs) "
        f"make no {settings.layout!r} example of seq_len={settings.seq_len}; lower --eval-docs or --seq-len, "
        "or add documents"
    )


def write_manifest(
    output: Path, tok: Any, spec: str, settings: Settings, content: dict[str, Any], infos: list[dict[str, Any]]
) -> records.Manifest:
    """``tokenizer/`` and ``manifest.json`` of a directory whose shards are all complete."""
    if sum(i["train"]["examples"] for i in infos) == 0:
        raise _empty_corpus_error(infos, settings)
    tok_dir = output / records.TOKENIZER_DIR
    if not tok_dir.is_dir():
        tmp = output / f"{records.TOKENIZER_DIR}.{os.getpid()}{records.TMP_SUFFIX}"
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, tok_dir)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    shards = [
        {
            **i["train"],
            "source": i["source"],
            "documents_read": i["documents_read"],
            "tokens_read": i.get("tokens_read", 0),
        }
        for i in infos
    ]
    evaluation = infos[0].get("eval") if infos else None
    totals = {
        "train_examples": sum(s["examples"] for s in shards),
        "train_tokens": sum(s["tokens"] for s in shards),
        "train_documents": sum(s["documents"] for s in shards),
        "documents_read": sum(s["documents_read"] for s in shards),
        "tokens_read": sum(s["tokens_read"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards) + (evaluation["bytes"] if evaluation else 0),
    }
    manifest = {
        "format": records.FORMAT,
        "format_version": records.FORMAT_VERSION,
        "settings": content,
        "settings_hash": records.canonical_hash(content),
        "shards": shards,
        "eval": evaluation,
        "totals": totals,
    }
    manifest["fingerprint"] = records.canonical_hash(manifest)
    # Informational, not in the fingerprint: the spec (the units and their sizes are) and the tokenizer's
    # name (its hash is).
    manifest.update(source=spec, tokenizer_name=str(getattr(tok, "name_or_path", "") or ""))
    records.write_json_atomic(output / records.MANIFEST, manifest)
    return records.read_manifest(output)


def prepare(
    spec: str,
    tok: Any,
    output: str | os.PathLike,
    settings: Settings,
    *,
    num_shards: int = 1,
    shard_index: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> records.Manifest | None:
    """Prepares this process's shards of ``spec`` into ``output``; the manifest once every shard is done.

    Returns the ``Manifest`` when the directory is complete (now or before), ``None`` while
    shards of other processes are missing. Raises ``ValueError`` on bad input; nothing is then
    left of what this call began (a directory it created is removed if it holds no complete shard).
    """
    settings.validate()
    check_shard_args(num_shards, shard_index)
    units = source_units(spec, text_field=settings.text_field)
    content = settings_content(settings, tok, units)
    settings_hash = records.canonical_hash(content)
    output = Path(output)
    if records.is_prepared(output):
        manifest = records.read_manifest(output)
        if manifest.content["settings_hash"] != settings_hash:
            raise _other_settings_error(output, manifest.settings, content)
        try:
            manifest.check_files()
            return manifest
        except ValueError:  # a shard went missing or was damaged since: prepare it again below
            (output / records.MANIFEST).unlink()
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    encoder = DocumentEncoder(tok, settings, records.RecordLayout(**content["record_layout"]))
    count = len(units)
    try:
        todo = [
            i
            for i in range(shard_index, count, num_shards)
            if _complete_shard(output, i, count, settings_hash, content) is None
        ]
        with worker_pool(encoder, workers if todo else 1) as pool:
            for i in todo:
                prepare_unit(units[i], i, count, output, encoder, settings=content, pool=pool, progress=progress)
        infos = [_complete_shard(output, i, count, settings_hash, content) for i in range(count)]
        if any(info is None for info in infos):
            done = sum(info is not None for info in infos)
            print(
                f"{done} of {count} shards of {output} are complete; the process that completes the last one "
                "writes manifest.json",
                file=sys.stderr,
            )
            return None
        return write_manifest(output, tok, spec, settings, content, infos)
    except BaseException as e:
        if isinstance(e, EmptyCorpusError):
            _remove_outputs(output, count)
        if created and not any((output / records.shard_info_name(i, count)).exists() for i in range(count)):
            shutil.rmtree(output, ignore_errors=True)
        raise


def _remove_outputs(output: Path, count: int) -> None:
    """Deletes the shards and counts of a directory whose corpus made no training example."""
    for i in range(count):
        for name in (records.shard_name(i, count), records.shard_info_name(i, count)):
            (output / name).unlink(missing_ok=True)
    (output / records.EVAL_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.prepare_data", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        required=True,
        help="corpus: file or directory of .txt/.jsonl(.gz)/.json.gz/.parquet, "
        "hf:NAME[:CONFIG[:SPLIT]], or builtin:python-docs",
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id (e.g. roberta-base)")
    p.add_argument("--output", required=True, help="directory of the prepared shards and manifest.json")
    p.add_argument("--layout", default="blocks", choices=("blocks", "contiguous"))
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=128, help="tokens per sentence block (blocks layout)")
    p.add_argument(
        "--min-doc-tokens",
        type=int,
        default=DEFAULT_MIN_DOC_TOKENS,
        help="drop documents with fewer subword tokens (default: %(default)s, the seed's)",
    )
    p.add_argument("--eval-docs", type=int, default=0, help="kept documents of input 0 held out for evaluation")
    p.add_argument("--num-shards", type=int, default=1, help="processes (machines) sharing the work")
    p.add_argument("--shard-index", type=int, default=0, help="this process among --num-shards")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes on this machine")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/hf: rows holding the text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(
        layout=args.layout,
        seq_len=args.seq_len,
        block_size=args.block_size,
        min_doc_tokens=args.min_doc_tokens,
        eval_docs=args.eval_docs,
        text_field=args.text_field,
    )
    try:
        settings.validate()
        check_shard_args(args.num_shards, args.shard_index)
        if args.workers < 1:
            raise ValueError(f"--workers {args.workers} must be at least 1")
        tok = load_tokenizer(args.tokenizer, model_max_length=args.seq_len)
        t0 = time.perf_counter()
        manifest = prepare(
            args.data,
            tok,
            args.output,
            settings,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if manifest is not None:
        t = manifest.content["totals"]
        print(
            f"{args.output}: {t['train_examples']:,} training examples ({t['train_tokens']:,} tokens) from "
            f"{t['train_documents']:,} of {t['documents_read']:,} documents, {manifest.num_eval:,} evaluation "
            f"examples, {t['bytes'] / 2**20:,.1f} MiB in {len(manifest.content['shards'])} shards; "
            f"{time.perf_counter() - t0:,.1f} s; fingerprint {manifest.fingerprint}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
