"""The seed recipe and its neighbours compiled for TPU slices and an H100, on this CPU host: ``python -m bench.aot``.

Each row is one ``--target NAME --compile-only --report FILE`` run of ``python -m train.pretrain`` or
``python -m train.finetune`` (`train.aot`), in a process of its own, one after the other; its JSON report
is kept in ``bench/aot/`` (a row whose report is there is not compiled again unless ``--force``) and
``bench/aot.md`` is rewritten after every row, so a partial table is usable. Rows:

* the seed recipe (12 layers, 4,096 tokens, bfloat16, remat, batch 16 x accumulation 8 = 128, window
  128, 32 global slots, 50k steps; the layers scanned, ``--scan-layers``, which compiles one layer
  instead of twelve: the same step) on v4-8, v5e-8, v5p-8, v6e-8 and an H100, with ``blocked`` attention
  and with the target's kernel (``splash`` without attention dropout, which it cannot apply;
  ``pallas-gpu`` with it), and what ``--fit`` recommends;
* one 65,536-token document per row over a ``sequence`` axis of the 4 chips of a v5p-8;
* ``hat-ecthr`` fine-tuning (LexGLUE ECtHR-B, 10 labels, batch 8 x 4) on a v5e-8.

``--only SUBSTRING`` runs the rows whose name holds it; ``--list`` prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORTS = HERE / "aot"
TABLE = HERE / "aot.md"
SEED_TARGETS = ("v5e-8", "v4-8", "v5p-8", "v6e-8", "h100")
KERNEL = {"h100": "pallas-gpu"}  # TPU targets: splash
NO_ATTENTION_DROPOUT = ["--model", "attention_probs_dropout_prob=0.0"]
ECTHR_STEPS = 20 * (9000 // 32)  # 20 epochs of ECtHR's 9,000 training documents at 32 per step (early stopping: fewer)


def rows() -> list[tuple[str, list[str]]]:
    """(name, program arguments) of every row, in the order they are compiled (the most asked first)."""
    seed = ["train.pretrain", "--preset", "seed-recipe", "--scan-layers"]
    blocked = {t: (f"seed-{t}-blocked", [*seed, "--target", t]) for t in SEED_TARGETS}
    kernels = []
    for t in SEED_TARGETS:
        kernel = KERNEL.get(t, "splash")
        extra = [] if kernel == "pallas-gpu" else NO_ATTENTION_DROPOUT
        kernels.append(
            (f"seed-{t}-{kernel}", [*seed, "--target", t, "--model", f"attention_implementation={kernel}", *extra])
        )
    long = (
        "long-65536-v5p-8-sequence",
        [*seed, "--target", "v5p-8", "--seq-len", "65536", "--batch-size", "1", "--grad-accum-steps", "8"]
        + ["--mesh", "data=1,sequence=4", "--model", "max_position_embeddings=65539"],
    )
    ecthr = (
        "hat-ecthr-v5e-8",
        [
            "train.finetune",
            "--preset",
            "hat-ecthr",
            "--scan-layers",
            "--target",
            "v5e-8",
            "--max-steps",
            str(ECTHR_STEPS),
        ],
    )
    kernel = dict(zip(SEED_TARGETS, kernels))
    fits = {t: (f"seed-{t}-fit", [*seed, "--target", t, "--fit"]) for t in SEED_TARGETS}
    first = [blocked["v5e-8"], blocked["h100"], ecthr, blocked["v4-8"], long, kernel["h100"], kernel["v5e-8"]]
    first += [blocked["v5p-8"], blocked["v6e-8"], fits["h100"], kernel["v4-8"], kernel["v5p-8"], kernel["v6e-8"]]
    return first + [fits[t] for t in SEED_TARGETS if fits[t] not in first]


def run_row(name: str, args: list[str], force: bool) -> dict:
    """The row's report (compiled now, or read from bench/aot/NAME.json); on failure the error line."""
    report = REPORTS / f"{name}.json"
    if report.is_file() and not force:
        return json.loads(report.read_text())
    REPORTS.mkdir(exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    cmd = [sys.executable, "-m", *args, "--compile-only", "--report", str(report)]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    if report.is_file():
        r = json.loads(report.read_text())
    else:
        r = {"target": args[args.index("--target") + 1], "failed": errors[-1] if errors else p.stderr.strip()[-300:]}
        report.write_text(json.dumps(r, indent=2) + "\n")
    r["command"] = "python -m " + " ".join(args) + " --compile-only"
    if errors:
        r["error"] = errors[-1]
    r["wall_seconds"] = time.time() - t0
    report.write_text(json.dumps(r, indent=2) + "\n")
    print(f"  {time.time() - t0:.0f} s: {'fits' if r.get('fits') else r.get('error') or r.get('failed')}", flush=True)
    return r


def _gib(n) -> str:
    return "" if n is None else f"{n / (1 << 30):.2f}"


def table_row(name: str, r: dict) -> str:
    """One Markdown row of a report."""
    if "failed" in r:
        return f"| {name} | {r['target']} | | | | | | | | | | failed: {r['failed'][:200]} |"
    b, s, ev = r["per_device_bytes"], r["settings"], r.get("eval_per_device_bytes") or {}
    rec = r.get("recommended")
    days = r.get("run_time_lower_bound_days")
    fit = (
        f"`{rec['flags']}` ({_gib(rec['total_bytes'])} GiB, step >= {rec['step_time_lower_bound_s'] * 1e3:.0f} ms)"
        if rec
        else ("none fits" if "fit" in r else "")
    )
    return (
        f"| {name} | {r['target']} | {s['batch_size']}x{s['grad_accum_steps']}, {s['seq_len']}, "
        f"remat {'on' if s['remat'] else 'off'}{', scan' if s['scan_layers'] else ''}"
        f"{'' if s['mesh']['sequence'] == 1 else ', sequence ' + str(s['mesh']['sequence'])} "
        f"| {r['attention_implementation']} ({r['kernel_calls']} kernel calls) "
        f"| {_gib(b['total'])} ({_gib(b['arguments'])} + {_gib(b['temp'])}) | {_gib(ev.get('total'))} "
        f"| {_gib(r.get('usable_memory_bytes', r['device_memory_bytes']))} | {'yes' if r['fits'] else '**no**'} "
        f"| {r['step_time_lower_bound_s'] * 1e3:.0f} | {'' if days is None else f'{days:.3g}'} "
        f"| {r['compile_seconds']:.0f} | {fit} |"
    )


def write_table(done: dict[str, dict], names: list[str]) -> None:
    lines = [
        "# Compiled for the target on a CPU host: memory per device, fit and step-time bound",
        "",
        "Printed by `python -m bench.aot` (every row: `python -m train.pretrain|finetune ... --target NAME "
        "--compile-only`, reports in `bench/aot/`). Memory: XLA's memory analysis of the compiled train step "
        "(arguments + temporaries = the peak of the train and eval steps, outputs aliased to the donated state), "
        "GiB per device against what a run may use: a TPU's HBM, 75% of a GPU's (JAX's default preallocation, "
        "`XLA_PYTHON_CLIENT_MEM_FRACTION`). Step bound: the model's FLOPs per step (`longformer_jax.flops`, x4/3 "
        "with remat) at the chip's peak bf16 FLOP/s on every device; days: the bound x the run's steps. None of "
        "these numbers has been measured on the hardware itself. Every seed-recipe row scans its 12 layers "
        "(`--scan-layers`: the same step, one layer compiled instead of twelve); the splash rows train without "
        "attention dropout (`--model attention_probs_dropout_prob=0.0`: the kernel has none), pallas-gpu with it. "
        "`--fit` keeps the global batch and leaves 10% of the usable memory free (`--fit-headroom`).",
        "",
        "| row | target | batch x accum, tokens, remat, scan | attention | train step GiB per device (arguments + "
        "temp) | eval step GiB | usable GiB | fits | step >= ms | run >= days | compile s | --fit recommends |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [table_row(n, done[n]) for n in names if n in done]
    missing = [n for n in names if n not in done]
    if missing:
        lines += ["", f"Not compiled yet: {', '.join(missing)}."]
    TABLE.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="run only the rows whose name holds this")
    p.add_argument("--force", action="store_true", help="compile again rows that have a report")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    all_rows = rows()
    if args.list:
        print("\n".join(n for n, _ in all_rows))
        return 0
    names = [n for n, _ in all_rows]
    done = {n: json.loads((REPORTS / f"{n}.json").read_text()) for n in names if (REPORTS / f"{n}.json").is_file()}
    for name, a in all_rows:
        if args.only and args.only not in name:
            continue
        done[name] = run_row(name, a, args.force)
        write_table(done, names)
    write_table(done, names)
    print(f"table: {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
