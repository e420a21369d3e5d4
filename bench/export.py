"""Serving side by side: this project's exported model against PyTorch's Longformer and its ONNX exports.

    python -m bench.export [--hidden 768 --heads 12 --layers 2 --window 128] [--threads 2] [--out bench/export.md]

One random ``transformers`` LongformerForSequenceClassification (base width by default, ``--layers`` layers)
and the same weights converted to Flax. Columns: Flax under ``jax.jit``; the exported StableHLO programs run by
``longformer_jax.load_exported`` (jax and numpy only); the same export's ONNX files (jax2onnx) in onnxruntime;
PyTorch eager; PyTorch's own ONNX export with ``dynamo=True`` and the legacy TorchScript exporter, traced at
(2, 1024) and run in onnxruntime. Rows: does it export; max abs difference of the logits against PyTorch eager
on the traced input, another input of the same shape, another batch size, another length and a row without a
global token; then the median latency (ms) at batch 1 and 8, 1,024 and 4,096 tokens, every framework on the
same number of threads. The PyTorch ONNX rows run in a worker process (a crash there is a result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TRACED = (2, 1024)
# (row name, batch, length, seed, global token on <s>)
CASES = (
    ("traced input (2 x 1024)", 2, 1024, 0, True),
    ("other input, same shape", 2, 1024, 1, True),
    ("other batch (3 x 1024)", 3, 1024, 2, True),
    ("other length (2 x 512)", 2, 512, 3, True),
    ("no global token (2 x 1024)", 2, 1024, 4, False),
)
COLUMNS = ("Flax jit", "exported (StableHLO)", "ONNX (jax2onnx) in onnxruntime", "PyTorch eager")
TORCH_ONNX = {"dynamo": "PyTorch ONNX (dynamo=True)", "legacy": "PyTorch ONNX (legacy)"}


def case_arrays(batch: int, length: int, seed: int, global_first: bool, vocab: int):
    """(input_ids, attention_mask, global_attention_mask) int64: random tokens, <s> first, the last row padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, length)).astype(np.int64)
    ids[:, 0] = 0
    am = np.ones_like(ids)
    if batch > 1:
        ids[-1, length - length // 4 :], am[-1, length - length // 4 :] = 1, 0
    gm = np.zeros_like(ids)
    gm[:, 0] = int(global_first)
    return ids, am, gm


def hf_config(args):
    import transformers

    return transformers.LongformerConfig(
        vocab_size=50265,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        attention_window=args.window,
        max_position_embeddings=4098,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        sep_token_id=2,
        num_labels=2,
    )


def build_models(args, work: Path):
    """The random PyTorch model (saved to work/hf) and the same weights exported to work/export."""
    import torch
    import transformers

    import longformer_jax as lj
    from longformer_jax.export import export_model
    from longformer_jax.pretrained import load_checkpoint

    torch.manual_seed(0)
    hf = transformers.LongformerForSequenceClassification(hf_config(args)).eval()
    hf.save_pretrained(str(work / "hf"))
    config, task, params, _ = load_checkpoint(work / "hf")
    model = lj.build_model(config, task)
    t = time.perf_counter()
    export_model(
        model,
        params,
        work / "export",
        lengths=[512, 1024, 4096],
        num_global_slots=1,
        onnx=True,
        verify=False,
        log=print,
    )
    print(f"exported in {time.perf_counter() - t:.0f} s", flush=True)
    return hf, model, params


def ours(args, hf, model, params, work: Path) -> dict[str, Any]:
    """Columns of this project and PyTorch eager: diffs and latencies."""
    import jax
    import torch

    import longformer_jax as lj

    flax_fn = jax.jit(
        lambda p, i, a, g: (
            model.apply({"params": p}, i, attention_mask=a, global_attention_mask=g, num_global_slots=1).logits
        )
    )
    exported = lj.load_exported(work / "export")
    onnx = lj.load_exported(work / "export", backend="onnx", threads=args.threads)

    def run(column, ids, am, gm):
        if column == "Flax jit":
            return np.asarray(flax_fn(params, ids.astype(np.int32), am.astype(np.int32), gm.astype(np.int32)))
        if column == "PyTorch eager":
            with torch.no_grad():
                t = [torch.from_numpy(x) for x in (ids, am, gm)]
                return hf(input_ids=t[0], attention_mask=t[1], global_attention_mask=t[2]).logits.numpy()
        return (exported if column.startswith("exported") else onnx)(ids, am, gm)["logits"]

    diffs: dict[str, dict[str, str]] = {c: {} for c in COLUMNS}
    for name, b, n, seed, g in CASES:
        arrays = case_arrays(b, n, seed, g, 50265)
        want = run("PyTorch eager", *arrays)
        for column in COLUMNS[:-1]:
            diffs[column][name] = f"{np.max(np.abs(run(column, *arrays) - want)):.1e}"
        diffs["PyTorch eager"][name] = "0 (reference)"
    latency: dict[str, dict[str, str]] = {c: {} for c in COLUMNS}
    for b in args.batches:
        for n in args.lengths:
            arrays = case_arrays(b, n, 7, True, 50265)
            for column in COLUMNS:
                run(column, *arrays)  # compile / warm up
                times = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    run(column, *arrays)
                    times.append(time.perf_counter() - t)
                latency[column][f"{b} x {n}"] = f"{1e3 * float(np.median(times)):.0f}"
                print(f"{column} {b} x {n}: {latency[column][f'{b} x {n}']} ms", flush=True)
    return {"diffs": diffs, "latency": latency}


# ---------------------------------------------------------------------------------------- PyTorch's ONNX export
def _cause(e: BaseException) -> str:
    """The line of an exporter's error that names the cause (a data-dependent guard), else its first line."""
    chain, seen = [], e
    while seen is not None:
        chain.append(re.sub(r"\x1b\[[0-9;]*m", "", str(seen)))
        seen = seen.__cause__ or seen.__context__
    lines = [ln.strip() for text in chain for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        m = re.search(r"(Could not guard on data-dependent expression .+?)(?: \(|$)", ln)
        if m:
            return "GuardOnDataDependentSymNode: " + m.group(1)[:90].replace("|", "/")
    return (lines[0] if lines else type(e).__name__)[:110].replace("|", "/")


def torch_onnx_worker(exporter: str, work: Path, result: Path, threads: int) -> None:
    """Exports the PyTorch model with ``exporter`` at the traced shape, then runs every case in onnxruntime;
    writes what happened to ``result`` after each step (a crash leaves the step it died in)."""
    import onnxruntime
    import torch
    import transformers

    torch.set_num_threads(threads)
    hf = transformers.LongformerForSequenceClassification.from_pretrained(str(work / "hf")).eval()
    state: dict[str, Any] = {"export": "started"}

    def save():
        result.write_text(json.dumps(state))

    save()
    path = work / f"torch_{exporter}.onnx"
    ids, am, gm = (torch.from_numpy(x) for x in case_arrays(*TRACED, 0, True, 50265))
    try:
        torch.onnx.export(
            hf,
            (ids, am, gm),
            str(path),
            input_names=["input_ids", "attention_mask", "global_attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                k: {0: "batch", 1: "length"} for k in ("input_ids", "attention_mask", "global_attention_mask")
            },
            dynamo=exporter == "dynamo",
        )
        state["export"] = "yes"
    except Exception as e:  # the result of this column
        state["export"] = f"no: {type(e).__name__}: {_cause(e)}"
        save()
        return
    save()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for name, b, n, seed, g in CASES:
        arrays = case_arrays(b, n, seed, g, 50265)
        state[name] = "crashed (the process died)"
        save()
        with torch.no_grad():
            want = hf(*(torch.from_numpy(x) for x in arrays[:2]), global_attention_mask=torch.from_numpy(arrays[2]))
        try:
            got = session.run(None, dict(zip(["input_ids", "attention_mask", "global_attention_mask"], arrays)))[0]
            state[name] = f"{np.max(np.abs(got - want.logits.numpy())):.1e}"
        except Exception as e:  # the result of this row
            state[name] = f"error: {str(e).strip().splitlines()[0][:60]}"
        save()
    b, n = TRACED
    arrays = dict(zip(["input_ids", "attention_mask", "global_attention_mask"], case_arrays(b, n, 7, True, 50265)))
    session.run(None, arrays)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        session.run(None, arrays)
        times.append(time.perf_counter() - t)
    state["latency"] = f"{1e3 * float(np.median(times)):.0f}"
    save()


def torch_onnx(exporter: str, work: Path, threads: int) -> dict[str, Any]:
    result = work / f"torch_{exporter}.json"
    cmd = [sys.executable, "-m", "bench.export", "--worker", exporter, "--work", str(work), "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    state = json.loads(result.read_text()) if result.is_file() else {"export": f"worker failed: {r.stderr[-200:]}"}
    if r.returncode < 0:
        import signal

        state["signal"] = signal.Signals(-r.returncode).name
        state = {
            k: (f"crashed ({state['signal']})" if v == "crashed (the process died)" else v) for k, v in state.items()
        }
    return state


# ---------------------------------------------------------------------------------------- the table
def table(args, mine: dict[str, Any], theirs: dict[str, dict[str, Any]]) -> str:
    cols = [*COLUMNS, *TORCH_ONNX.values()]
    lines = [
        f"Sequence classification, random weights: hidden {args.hidden}, {args.heads} heads, {args.layers} layers, "
        f"window {args.window}, vocabulary 50265; CPU, {args.threads} threads for every framework; one global "
        "token (<s>). Differences: max abs of the logits against PyTorch eager. Latency: median of "
        f"{args.reps} calls, ms (PyTorch's ONNX exports only at their traced shape, 2 x 1024).",
        "",
        "| | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    exports = ["yes (1 program per bucket, symbolic batch)", "yes", "yes (jax2onnx 0.17)", "-"]
    exports += [theirs[k]["export"] for k in TORCH_ONNX]
    lines.append("| exports | " + " | ".join(exports) + " |")
    for name, *_ in CASES:
        cells = [mine["diffs"][c][name] for c in COLUMNS] + [theirs[k].get(name, "-") for k in TORCH_ONNX]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for b in args.batches:
        for n in args.lengths:
            key = f"{b} x {n}"
            cells = [mine["latency"][c][key] for c in COLUMNS]
            cells += [theirs[k].get("latency", "-") if (b, n) == TRACED else "-" for k in TORCH_ONNX]
            lines.append(f"| latency {key} (ms) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--worker", choices=list(TORCH_ONNX), help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        torch_onnx_worker(args.worker, Path(args.work), Path(args.work) / f"torch_{args.worker}.json", args.threads)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf, model, params = build_models(args, work)
        theirs = {k: torch_onnx(k, work, args.threads) for k in TORCH_ONNX}
        print(json.dumps(theirs, indent=1), flush=True)
        mine = ours(args, hf, model, params, work)
    text = table(args, mine, theirs)
    print(text)
    if args.out:
        cmd = "python -m bench.export " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).write_text(f"# Serving: exported model vs PyTorch\n\n`{cmd.strip()}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
