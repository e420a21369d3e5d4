"""Speed and memory of this project's Longformer next to the ``transformers`` PyTorch one.

    python -m bench.run                 # the full CPU table (about 15 minutes on 2 cores)
    python -m bench.run --quick         # a small subset, under 2 minutes
    python -m bench.run --cases mlm     # only the masked-LM pretraining step (writes results-mlm.*)
    python -m bench.run --device gpu    # bfloat16, larger batch, model FLOPs utilisation

Every measurement runs in a fresh worker process (``bench.jax_case`` / ``bench.torch_case``) with
the same config and the same inputs on both sides; times are taken after a warm-up call (and, for
JAX, after compilation, which is reported separately). Writes ``results.md`` (the table),
``results.json`` (every number) and ``results.png`` (tokens/s against length) to ``--out``.

Case groups (``--cases``): ``main``, the encoder's forward pass and a token-classification train
step per (window, globals, length), with the dense-attention baseline and the compile times; and
``mlm``, the pretraining step: ``LongformerForMaskedLM`` at 4,096 tokens in the seed's layout (32
blocks of 128, global attention on the block starts, 15% masking), JAX with the LM head at the
masked positions only, PyTorch with ``transformers``' full-vocabulary head, both with AdamW. A run
of only some groups writes ``results-<groups>.{md,json}`` beside the full run's files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from bench import common
from longformer_jax.compile_options import training_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (window, global tokens): allenai's window without globals, the seed checkpoint's shape, and the
# two other combinations.
MAIN_CONFIGS = [(512, 0), (128, 32)]
OTHER_CONFIGS = [(512, 32), (128, 0)]
CASE_GROUPS = ("main", "mlm")
# The masked-LM pretraining step: the seed's layout at 4096 tokens (32 blocks of 128, globals on block starts).
MLM_CASE = dict(task="mlm", length=4096, block=128, window=128, globals=32, modes=["train"])
MLM_SPEED_GOAL, MLM_MEMORY_GOAL = 1.5, 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small subset (1024 and 4096 tokens, one layer)")
    p.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated case groups out of {', '.join(CASE_GROUPS)} (default: all; main with --quick)",
    )
    p.add_argument("--layers", type=int, default=None, help="encoder layers (default 2 on CPU, 12 on GPU)")
    p.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 1 on CPU, 8 on GPU)")
    p.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--out", default=os.path.join(REPO, "bench"), help="directory for results.{md,json,png}")
    p.add_argument("--no-torch", action="store_true", help="time only this project")
    p.add_argument("--no-dense", action="store_true", help="skip the dense-attention baseline")
    p.add_argument(
        "--compile-layers", type=int, default=None, help="layers of the compile-time measurement (default 12; 0: skip)"
    )
    p.add_argument("--block-size", type=int, default=None, help="attention_block_size of the JAX model")
    p.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="glibc malloc settings of the worker processes (the same for both frameworks)",
    )
    p.add_argument("--peak-flops", type=float, default=None, help="nominal peak FLOP/s for MFU (GPU)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    p.add_argument("--render", default=None, help="only rebuild results.{md,png} from this results.json")
    args = p.parse_args(argv)
    args.cases_given = args.cases is not None
    if args.cases is None:
        args.cases = "main" if args.quick else ",".join(CASE_GROUPS)
    unknown = sorted(set(args.cases.split(",")) - set(CASE_GROUPS))
    if unknown:
        p.error(f"--cases {args.cases}: unknown group(s) {', '.join(unknown)}; choose from {', '.join(CASE_GROUPS)}")
    return args


def _reps(length: int, quick: bool) -> dict:
    """Timed calls per mode and untimed warm-up calls before them.

    At 16384 tokens the first calls still grow the heap (page faults that later calls do not pay),
    so three warm-up calls come first there."""
    if quick:
        return {"fwd": 2, "train": 2, "warmup": 1}
    if length <= 4096:
        return {"fwd": 3, "train": 2, "warmup": 1}
    return {"fwd": 3, "train": 2, "warmup": 3}


def plan(args) -> dict:
    gpu = args.device == "gpu"
    layers = args.layers or (12 if gpu else (1 if args.quick else 2))
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = [1024] if args.quick else [1024, 4096, 16384]
    configs = MAIN_CONFIGS if (args.quick or gpu) else MAIN_CONFIGS + OTHER_CONFIGS
    base = dict(
        layers=layers,
        batch=args.batch or (8 if gpu else 1),
        dtype=args.dtype or ("bfloat16" if gpu else "float32"),
        device=args.device,
        block_size=args.block_size,
    )
    groups = args.cases.split(",")
    cases = mlm_cases(base, args) if "mlm" in groups else []
    compile_cases = []
    if "main" in groups:
        cases += main_cases(args, base, lengths, configs, gpu)
        compile_cases = _compile_cases(args, base)
    return {
        "layers": layers,
        "lengths": lengths,
        "cases": cases,
        "compile_cases": compile_cases,
        "groups": groups,
        **base,
    }


def mlm_cases(base: dict, args) -> list[dict]:
    """The masked-LM pretraining step, JAX (masked-only head) and PyTorch (full head)."""
    c = dict(base, **MLM_CASE, reps={"train": 2, "warmup": 1})
    c["masked_tokens"] = common.masked_tokens(c)
    return [dict(c, framework=fw) for fw in ("jax", "torch") if fw == "jax" or not args.no_torch]


def main_cases(args, base: dict, lengths: list[int], configs: list, gpu: bool) -> list[dict]:
    """The forward and token-classification train cases per (window, globals, length), and the dense baseline."""
    cases = []
    # The target cases (4096 tokens) first, so that a run cut short still has them.
    order = sorted(lengths, key=lambda L: (L != 4096, L))
    for window, G in configs:
        for L in order:
            if (window, G) in OTHER_CONFIGS and L != 4096:
                continue  # the two other combinations at 4096 tokens only (time)
            c = dict(base, length=L, window=window, globals=G, reps=_reps(L, args.quick), modes=["fwd", "train"])
            if gpu and not args.batch:
                c["batch"] = max(1, 32768 // L)  # 32 768 tokens per batch: 8 x 4096, 2 x 16384
            cases.append(dict(c, framework="jax"))
            if not args.no_torch:
                cases.append(dict(c, framework="torch"))
    if not args.no_dense:
        for L in lengths:
            # (heads, L, L) float32 scores: 12 GiB at 16384 on one sequence; the baseline stops at 4096.
            batch = base["batch"] if (args.batch or not gpu) else max(1, 32768 // L)
            if L * L * 12 * 4 * batch > 2**31 * (8 if gpu else 1):
                continue
            cases.append(
                dict(
                    base,
                    length=L,
                    window=512,
                    globals=0,
                    reps=_reps(L, args.quick),
                    modes=["fwd", "train"],
                    framework="dense",
                    batch=batch,
                )
            )
    return cases


def _compile_cases(args, base: dict) -> list[dict]:
    if args.compile_layers is None:
        args.compile_layers = 0 if args.quick else 12
    if not args.compile_layers:
        return []
    return [
        dict(base, layers=args.compile_layers, length=4096, window=window, globals=G, framework="jax", batch=1)
        for window, G in MAIN_CONFIGS
    ]


# ---------------------------------------------------------------------------------------- workers
def run_worker(module: str, spec: dict, args) -> dict:
    env = dict(os.environ)
    if args.malloc == "tuned":
        env.update(common.MALLOC_ENV)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if module == "bench.jax_case":
        # The XLA flags that python -m train.pretrain runs with (longformer_jax.compile_options).
        env["XLA_FLAGS"] = training_xla_flags(env.get("XLA_FLAGS", ""))
    cmd = [sys.executable, "-m", module, json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            out = json.loads(line[len("BENCH_RESULT ") :])
            out["process_s"] = wall
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------- report
def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _entry(c: dict, mode: str, res: dict, peak: float, gpu: bool) -> dict:
    """The numbers of one (framework, case, mode): time, tokens/s, efficiency, memory, compile time."""
    if "error" in res:
        return {"error": res["error"]}
    m = res["modes"][mode]
    t = median(m["times_s"])
    flops = common.step_flops(c, mode, dense=c["framework"] == "dense")
    return {
        "time_s": t,
        "tokens_per_s": c["batch"] * c["length"] / t,
        "model_flops": flops,
        "efficiency": flops / t / peak,
        # On a GPU the memory that matters is the device's: torch's allocator peak, XLA's analysis.
        "peak_rss_bytes": (
            (m.get("peak_device_bytes") if c["framework"] == "torch" else _xla_total(m.get("xla_memory")))
            if gpu
            else m.get("peak_rss_bytes")
        ),
        "peak_device_bytes": m.get("peak_device_bytes"),
        "xla_memory": m.get("xla_memory"),
        "compile_s": m.get("compile_s"),
        "times_s": m["times_s"],
    }


def _peak(raw: dict) -> float:
    """Reference FLOP/s of the efficiency column: the nominal peak when given (MFU), else the
    matrix-product FLOP/s measured in this run."""
    return raw["args"].get("peak_flops") or raw["matmul"]["flops_per_s"]


def summarise(raw: dict, p: dict) -> list[dict]:
    """One row per (window, globals, length, mode) with both frameworks side by side (the main cases)."""
    peak, gpu = _peak(raw), p["device"] == "gpu"
    main = [r for r in raw["cases"] if r["spec"].get("task") != "mlm"]
    by_key = {}
    for r in main:
        c = r["spec"]
        for mode in c["modes"]:
            by_key[(c["framework"], c["window"], c["globals"], c["length"], mode)] = _entry(
                c, mode, r["result"], peak, gpu
            )
    rows = []
    seen = set()
    for r in main:
        c = r["spec"]
        if c["framework"] == "dense":
            continue
        for mode in c["modes"]:
            k = (c["window"], c["globals"], c["length"], mode)
            if k in seen:
                continue
            seen.add(k)
            rows.append(
                {
                    "window": c["window"],
                    "globals": c["globals"],
                    "length": c["length"],
                    "mode": mode,
                    "jax": by_key.get(("jax",) + k),
                    "torch": by_key.get(("torch",) + k),
                    "dense": by_key.get(("dense", 512, 0, c["length"], mode)) if k[:2] == (512, 0) else None,
                }
            )
    return rows


def summarise_mlm(raw: dict, p: dict) -> dict | None:
    """The masked-LM step, ``{"case", "jax", "torch"}``; None when the run has no such case."""
    peak, gpu = _peak(raw), p["device"] == "gpu"
    out = {}
    for r in raw["cases"]:
        c = r["spec"]
        if c.get("task") == "mlm":
            out["case"] = c
            out[c["framework"]] = _entry(c, "train", r["result"], peak, gpu)
    return out or None


def _xla_total(m):
    if not m:
        return None
    return m["temp"] + m["argument"] + m["output"] - m.get("alias", 0)


def _layers(p) -> str:
    return f"{p['layers']} encoder layer{'s' if p['layers'] != 1 else ''}"


def _mb(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _ms(r):
    return "-" if not r or "error" in r else f"{r['time_s'] * 1e3:,.0f}"


def _tps(r):
    return "-" if not r or "error" in r else f"{r['tokens_per_s']:,.0f}"


def _eff(r):
    return "-" if not r or "error" in r else f"{100 * r['efficiency']:.0f}%"


def _xla_mb(r):
    if not r or "error" in r or not r.get("xla_memory"):
        return "-"
    m = r["xla_memory"]
    return _mb(m["temp"] + m["argument"] + m["output"] - m.get("alias", 0))


def _ratio(a, b):
    if not a or not b or "error" in a or "error" in b:
        return None
    return a["tokens_per_s"] / b["tokens_per_s"]


def targets(rows, raw) -> list[dict]:
    """The issue's targets, each with the measured number and met / not met."""
    get = {(r["window"], r["globals"], r["length"], r["mode"]): r for r in rows}
    out = []

    def add(name, value, goal, ok, fmt):
        out.append({"target": name, "measured": value, "goal": goal, "met": ok, "text": fmt})

    def ratio(w, g, L, mode):
        r = get.get((w, g, L, mode))
        return None if r is None else _ratio(r["jax"], r["torch"])

    for w, g, mode, goal, label in [
        (512, 0, "fwd", 1.5, "Forward, 4096 tokens, window 512: JAX/PyTorch tokens/s"),
        (128, 32, "fwd", 1.1, "Forward, 4096 tokens, window 128 + 32 globals: JAX/PyTorch tokens/s"),
        (512, 0, "train", 1.5, "Train step, 4096 tokens, window 512: JAX/PyTorch tokens/s"),
        (128, 32, "train", 1.5, "Train step, 4096 tokens, window 128 + 32 globals: JAX/PyTorch tokens/s"),
    ]:
        v = ratio(w, g, 4096, mode)
        if v is not None:
            add(label, v, goal, v >= goal, f"{v:.2f}x (goal >= {goal}x)")
    for w, g in MAIN_CONFIGS:
        r = get.get((w, g, 4096, "fwd"))
        if r and r["jax"] and "error" not in r["jax"]:
            e = r["jax"]["efficiency"]
            add(
                f"Forward compute efficiency, 4096 tokens, window {w} + {g} globals",
                e,
                0.85,
                e >= 0.85,
                f"{100 * e:.0f}% (goal >= 85%)",
            )
    for w, g in MAIN_CONFIGS:
        for mode in ("fwd", "train"):
            a, b = get.get((w, g, 4096, mode)), get.get((w, g, 16384, mode))
            if a and b and a["jax"] and b["jax"] and "error" not in a["jax"] and "error" not in b["jax"]:
                v = b["jax"]["time_s"] / a["jax"]["time_s"]
                add(
                    f"Time at 16384 / time at 4096 ({mode}, window {w} + {g} globals)",
                    v,
                    4.4,
                    v <= 4.4,
                    f"{v:.2f}x (goal <= 4.4x)",
                )
    for w, g in MAIN_CONFIGS:
        r = get.get((w, g, 16384, "train"))
        if r and r["jax"] and r["torch"] and "error" not in r["jax"] and "error" not in r["torch"]:
            a, b = r["jax"]["peak_rss_bytes"], r["torch"]["peak_rss_bytes"]
            if a and b:
                v = a / b
                add(
                    f"Train-step peak memory at 16384, window {w} + {g} globals: JAX/PyTorch",
                    v,
                    0.5,
                    v <= 0.5,
                    f"{_mb(a)} MiB vs {_mb(b)} MiB = {v:.2f} (goal <= 0.5)",
                )
    for c in raw.get("compile", []):
        if "error" in c:
            continue
        s = c["total_s"]
        cc = c["case"]
        add(
            f"Compile, {cc['layers']}-layer forward, 4096 tokens, window {cc['window']} + {cc['globals']} globals",
            s,
            30.0,
            s < 30.0,
            f"{s:.1f} s (goal < 30 s)",
        )
    return out


def mlm_targets(mlm: dict | None) -> list[dict]:
    """The masked-LM step's targets: >= 1.5x PyTorch's tokens/s, <= 0.5x its peak memory."""
    if not mlm or not mlm.get("jax") or not mlm.get("torch"):
        return []
    j, t = mlm["jax"], mlm["torch"]
    out = []
    speed = _ratio(j, t)
    if speed is not None:
        out.append(
            {
                "target": "MLM train step, 4096 tokens in the seed's layout: JAX/PyTorch tokens/s",
                "measured": speed,
                "goal": MLM_SPEED_GOAL,
                "met": speed >= MLM_SPEED_GOAL,
                "text": f"{speed:.2f}x (goal >= {MLM_SPEED_GOAL}x)",
            }
        )
    a, b = j.get("peak_rss_bytes"), t.get("peak_rss_bytes")
    if a and b:
        v = a / b
        out.append(
            {
                "target": "MLM train step, 4096 tokens in the seed's layout: peak memory JAX/PyTorch",
                "measured": v,
                "goal": MLM_MEMORY_GOAL,
                "met": v <= MLM_MEMORY_GOAL,
                "text": f"{_mb(a)} MiB vs {_mb(b)} MiB = {v:.2f} (goal <= {MLM_MEMORY_GOAL})",
            }
        )
    return out


def mlm_markdown(mlm: dict) -> list[str]:
    """The masked-LM step's table."""
    c, j, t = mlm["case"], mlm.get("jax"), mlm.get("torch")
    ok_j, ok_t = bool(j) and "error" not in j, bool(t) and "error" not in t
    ratio = _ratio(j, t)
    mem = j["peak_rss_bytes"] / t["peak_rss_bytes"] if ok_j and ok_t and t["peak_rss_bytes"] else None
    cells = [
        _ms(j),
        _ms(t),
        _tps(j),
        _tps(t),
        "-" if ratio is None else f"**{ratio:.2f}x**",
        _eff(j),
        _eff(t),
        _mb(j["peak_rss_bytes"]) if ok_j else "-",
        _mb(t["peak_rss_bytes"]) if ok_t else "-",
        "-" if mem is None else f"**{mem:.2f}**",
        _xla_mb(j),
        f"{j['compile_s']:.1f}" if ok_j else "-",
    ]
    return [
        f"MLM train step (`LongformerForMaskedLM`, AdamW) at {c['length']} tokens in the seed's layout: "
        f"{c['length'] // c['block']} blocks of {c['block']}, global attention on the block starts, window "
        f"{c['window']}, 15% masking ({c['masked_tokens']} masked tokens); JAX computes the LM head at the masked "
        "positions only, PyTorch its full-vocabulary head at every position:",
        "",
        "| JAX ms | PyTorch ms | JAX tok/s | PyTorch tok/s | JAX / PyTorch | JAX eff. | PyTorch eff. "
        "| JAX peak MiB | PyTorch peak MiB | memory JAX / PyTorch | JAX XLA MiB | JAX compile s |",
        "|" + "---:|" * 12,
        "| " + " | ".join(cells) + " |",
    ]


def _main_table(rows) -> list[str]:
    """The main cases' table and the dense-attention baseline."""
    lines = []
    lines.append(
        "| window | globals | tokens | step | JAX ms | PyTorch ms | JAX tok/s | PyTorch tok/s | JAX / PyTorch "
        "| JAX eff. | PyTorch eff. | JAX peak MiB | PyTorch peak MiB | JAX XLA MiB | JAX compile s |"
    )
    lines.append("|" + "---:|" * 15)
    for r in rows:
        j, t = r["jax"], r["torch"]
        ratio = _ratio(j, t)
        lines.append(
            (
                "| {w} | {g} | {L} | {mode} | {jms} | {tms} | {jt} | {tt} | {ratio} | {je} | {te} | {jm} | {tm} "
                "| {jx} | {jc} |"
            ).format(
                w=r["window"],
                g=r["globals"],
                L=r["length"],
                mode="forward" if r["mode"] == "fwd" else "train step",
                jms=_ms(j),
                tms=_ms(t),
                jt=_tps(j),
                tt=_tps(t),
                ratio="-" if ratio is None else f"**{ratio:.2f}x**",
                je=_eff(j),
                te=_eff(t),
                jm=_mb(j.get("peak_rss_bytes")) if j and "error" not in j else "-",
                tm=_mb(t.get("peak_rss_bytes")) if t and "error" not in t else "-",
                jx=_xla_mb(j),
                jc="-" if not j or "error" in j else f"{j['compile_s']:.1f}",
            )
        )
    dense_rows = [r for r in rows if r["dense"]]
    if dense_rows:
        lines.append("")
        lines.append(
            "Dense-attention baseline (the same encoder with plain O(L^2) softmax attention, JAX), against the "
            "band (window 512, no globals):"
        )
        lines.append("")
        lines.append(
            "| tokens | step | dense ms | band ms | band speed-up | dense eff. | dense peak MiB | band peak MiB |"
        )
        lines.append("|" + "---:|" * 8)
        for r in dense_rows:
            d, j = r["dense"], r["jax"]
            sp = _ratio(j, d)
            lines.append(
                f"| {r['length']} | {'forward' if r['mode'] == 'fwd' else 'train step'} | {_ms(d)} | {_ms(j)} | "
                f"{'-' if sp is None else f'{sp:.2f}x'} | {_eff(d)} | "
                f"{_mb(d.get('peak_rss_bytes')) if d and 'error' not in d else '-'} | "
                f"{_mb(j.get('peak_rss_bytes')) if j and 'error' not in j else '-'} |"
            )
    return lines


def markdown(raw, rows, p) -> str:
    peak = raw["matmul"]["flops_per_s"]
    torch_peak = raw.get("torch_matmul", {}).get("flops_per_s")
    lines = []
    batch = (
        "32768 tokens per batch (32 x 1024, 8 x 4096, 2 x 16384)"
        if p["device"] == "gpu" and not raw["args"].get("batch")
        else f"batch {p['batch']}"
    )
    lines.append(
        f"Base size (hidden 768, 12 heads, FFN 3072, vocab 50265), **{_layers(p)}**, {batch}, "
        f"{p['dtype']}, {raw['machine']['device']}; {raw['machine']['date']}."
    )
    lines.append(
        f"Matrix-product peak measured in the same run: JAX {peak / 1e9:,.1f} GFLOP/s"
        + (f", PyTorch {torch_peak / 1e9:,.1f} GFLOP/s" if torch_peak else "")
        + f" ({p['dtype']} `jnp.dot`, best of {', '.join(raw['matmul']['by_shape'])})."
    )
    if rows:
        lines += [""] + _main_table(rows)
    mlm = raw.get("mlm")
    if mlm:
        lines += [""] + mlm_markdown(mlm)
    errors = [(r["spec"], r["result"]["error"]) for r in raw["cases"] if "error" in r["result"]]
    if errors:
        lines.append("")
        for spec, err in errors:
            what = " masked-LM step" if spec.get("task") == "mlm" else ""
            lines.append(
                f"- not measured: {spec['framework']}{what} L={spec['length']} window={spec['window']} "
                f"globals={spec['globals']}: {err}"
            )
    lines.append("")
    lines.append("Targets:")
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---:|:---:|")
    for t in raw["targets"]:
        lines.append(f"| {t['target']} | {t['text']} | {'yes' if t['met'] else '**no**'} |")
    lines.append("")
    lines.append("How it was measured:")
    lines.append("")
    for n in notes(raw, p):
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def notes(raw, p) -> list[str]:
    malloc = (
        "glibc malloc in every worker process, both frameworks alike: "
        + " ".join(f"{k}={v}" for k, v in common.MALLOC_ENV.items())
        + " (keeps freed buffers in the heap instead of page-faulting them in again on every call)"
        if raw["args"]["malloc"] == "tuned"
        else "default glibc malloc settings"
    )
    malloc += (
        "; the JAX workers run with the XLA flags of `python -m train.pretrain`: "
        f"XLA_FLAGS={training_xla_flags()!r} (longformer_jax/compile_options.py)"
    )
    gpu = p["device"] == "gpu"
    memory = (
        "peak MiB (GPU) = device memory: PyTorch's `torch.cuda.max_memory_allocated` above the allocation "
        "before the timed calls; JAX: the compiled program's analysis (temp + arguments + outputs - aliased)."
        if gpu
        else "peak MiB = peak resident memory of the worker process during the first (warm-up) step, above "
        "the resident memory just before it (parameters and inputs already in memory; the optimizer "
        "state, gradients and activations count), read from /proc (VmHWM after clear_refs, freed heap "
        "returned with malloc_trim first); the peak over all calls, which also counts the heap's "
        "fragmentation under the allocator settings above, is in results.json. The same method for both "
        "frameworks; it includes what the "
        "runtime itself allocates (XLA's matmul packing buffers, thread scratch), so it is above the "
        "compiled program's own analysis, JAX XLA MiB (temp + arguments + outputs - aliased)."
    )
    eff = (
        f"eff. = model FLOPs utilisation against the nominal peak {raw['args']['peak_flops'] / 1e12:.0f} TFLOP/s."
        if raw["args"].get("peak_flops")
        else "eff. (compute efficiency) = model matmul FLOPs / time / the matmul FLOP/s measured in this run "
        "(JAX's `jnp.dot`, the better of the measurements at the start and the end of the run)."
    )
    return [
        f"Command: `{raw['command']}`; {raw['machine']['cpus']} CPU cores, PyTorch with "
        f"`torch.set_num_threads({raw['machine']['cpus']})`, JAX {raw['machine']['jax']}, "
        f"PyTorch {raw['machine']['torch']}, transformers {raw['machine']['transformers']}; {malloc}.",
        "Each (framework, case) runs in a fresh process with the same config and the same inputs "
        "(token ids with a fixed seed, no padding; globals on the first token of each of G equal "
        "blocks, which at 4096 tokens is the seed checkpoint's 128-token block layout). Time: median of "
        "the timed calls after the warm-up calls (timed calls forward/train: 3/2 after one warm-up call at "
        "1024 and 4096 tokens, 3/2 after three warm-up calls at 16384, which let the heap reach its steady size; "
        "every time is in results.json); JAX's compile time is measured separately "
        "(ahead of time) and not included.",
        "forward: the encoder (`LongformerModel`, no pooler), PyTorch in eval mode under `no_grad`. "
        "train step: `LongformerForTokenClassification` (2 labels, loss on every token), dropout 0.1 on, "
        "forward + backward + AdamW (lr 1e-4, weight decay 0.01); JAX jits the whole step with the "
        "parameters and optimizer state donated.",
        "tok/s = tokens per second (batch x length / time). JAX / PyTorch = ratio of tokens/s.",
        eff + " Model FLOPs are those of the exact model: projections, feed-forward, 2w+1 band keys per query, "
        "global columns and rows (the global queries over every key at the cheaper of HF's projection of "
        "every global key and value and this project's folding of those projections into the G queries); "
        "a train step counts 3x the forward. Work an implementation does beyond that (the blocked "
        "band's unused corners, HF's 2x overlapping chunks) is not counted.",
        memory,
    ] + (
        [
            "masked-LM step: `LongformerForMaskedLM` in train mode, dropout 0.1, AdamW (lr 1e-4, weight decay 0.01); "
            "token ids drawn at random (fixed seed) into the seed's sentence-block layout, each block of 64-127 tokens "
            "padded inside the sequence, masked by `train.masking` (fairseq's RoBERTa masking, 15%); JAX takes the "
            "masked slots (`masked_positions`, `masked_labels`), PyTorch the per-token labels of the same masking. "
            "Model FLOPs count the LM head at the masked tokens only (the loss needs no more); tok/s counts every "
            "position, padding included, on both sides."
        ]
        if raw.get("mlm")
        else []
    )


def plot(rows, path: str, p) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fwd", "train")):
        for (w, g), style in zip(MAIN_CONFIGS + OTHER_CONFIGS, ("o", "s", "^", "v")):
            for fw, ls in (("jax", "-"), ("torch", "--")):
                pts = [
                    (r["length"], r[fw]["tokens_per_s"])
                    for r in rows
                    if r["mode"] == mode and (r["window"], r["globals"]) == (w, g) and r[fw] and "error" not in r[fw]
                ]
                if not pts:
                    continue
                xs, ys = zip(*sorted(pts))
                name = "JAX (this project)" if fw == "jax" else "PyTorch (transformers)"
                ax.plot(xs, ys, ls, marker=style, label=f"{name}, window {w}, {g} globals")
        dense = [
            (r["length"], r["dense"]["tokens_per_s"])
            for r in rows
            if r["mode"] == mode and r["dense"] and "error" not in r["dense"]
        ]
        if dense:
            xs, ys = zip(*sorted(dense))
            ax.plot(xs, ys, ":", marker="x", color="gray", label="JAX dense O(L^2) attention")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("tokens / s")
        ax.set_title(("forward" if mode == "fwd" else "train step") + f" ({_layers(p)}, {p['dtype']})")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine_info(args) -> dict:
    import importlib.metadata as md

    def ver(n):
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = f"{cpu}, {common.cpu_count()} cores" if args.device == "cpu" else "GPU (see the worker output)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpus": common.cpu_count(),
        "jax": ver("jax"),
        "torch": ver("torch"),
        "transformers": ver("transformers"),
        "python": platform.python_version(),
    }


def results_stem(args: dict) -> str:
    """``results`` for a run of every case group (or of the default ones), ``results-<groups>`` otherwise."""
    groups = args.get("cases", ",".join(CASE_GROUPS)).split(",")
    if not args.get("cases_given") or set(groups) == set(CASE_GROUPS):
        return "results"
    return "results-" + "-".join(groups)


def write_report(raw: dict, p: dict, out: str) -> str:
    rows = summarise(raw, p)
    raw["rows"] = rows
    raw["mlm"] = summarise_mlm(raw, p)
    raw["targets"] = mlm_targets(raw["mlm"]) + targets(rows, raw)
    md_text = markdown(raw, rows, p)
    stem = os.path.join(out, results_stem(raw["args"]))
    with open(stem + ".md", "w") as f:
        f.write(md_text)
    with open(stem + ".json", "w") as f:
        json.dump(raw, f, indent=1)
    if rows:
        try:
            plot(rows, stem + ".png", p)
        except Exception as e:  # noqa: BLE001 - the table matters more than the plot
            log(f"plot failed: {e}")
    return md_text


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            raw = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        print(write_report(raw, raw["plan"], args.out))
        return
    p = plan(args)
    os.makedirs(args.out, exist_ok=True)
    raw = {
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "machine": machine_info(args),
        "plan": {k: v for k, v in p.items() if k not in ("cases", "compile_cases")},
        "cases": [],
    }
    t_start = time.perf_counter()
    log("matrix-product FLOP/s")
    raw["matmul"] = run_worker("bench.jax_case", {"kind": "matmul", "dtype": p["dtype"], "device": p["device"]}, args)
    if not args.no_torch:
        raw["torch_matmul"] = run_worker(
            "bench.torch_case", {"kind": "matmul", "dtype": p["dtype"], "device": p["device"]}, args
        )
    for spec in p["cases"]:
        log(
            f"{spec['framework']:5s} {spec.get('task', '')} L={spec['length']:5d} window={spec['window']} "
            f"globals={spec['globals']} {'+'.join(spec['modes'])}"
        )
        module = "bench.torch_case" if spec["framework"] == "torch" else "bench.jax_case"
        res = run_worker(module, {"case": spec}, args)
        if "error" in res:
            log(f"  error: {res['error']}")
        else:
            log("  " + ", ".join(f"{m} {median(v['times_s']) * 1e3:,.0f} ms" for m, v in res["modes"].items()))
        raw["cases"].append({"spec": spec, "result": res})
        with open(os.path.join(args.out, "results.partial.json"), "w") as f:
            json.dump(raw, f, indent=1)  # what is measured so far, should the run be cut short
    raw["compile"] = []
    for spec in p["compile_cases"]:
        log(f"compile {spec['layers']} layers L={spec['length']} window={spec['window']} globals={spec['globals']}")
        res = run_worker("bench.jax_case", {"kind": "compile", "case": spec}, args)
        log(f"  {res.get('total_s', res.get('error'))}")
        raw["compile"].append(res)
    # The peak again at the end: the reference is the better of the two (drift shows in the JSON).
    end = run_worker("bench.jax_case", {"kind": "matmul", "dtype": p["dtype"], "device": p["device"]}, args)
    raw["matmul_end"] = end
    if "flops_per_s" in end and end["flops_per_s"] > raw["matmul"]["flops_per_s"]:
        raw["matmul"] = dict(end, by_shape=end["by_shape"])
    raw["total_s"] = time.perf_counter() - t_start

    md_text = write_report(raw, p, args.out)
    partial = os.path.join(args.out, "results.partial.json")
    if os.path.exists(partial):
        os.remove(partial)
    print(md_text)
    log(f"done in {raw['total_s']:.0f} s; wrote {os.path.join(args.out, results_stem(raw['args']))}.{{md,json,png}}")


if __name__ == "__main__":
    main()
