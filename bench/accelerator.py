"""The MLM train step on a GPU or TPU, per attention implementation, next to ``transformers``.

    bash bench/accelerator.sh                   # GPU: installs what is missing, runs, writes the table
    bash bench/accelerator.sh tpu               # TPU (no transformers row: PyTorch would run on the host)
    python -m bench.accelerator --device gpu    # the same without the installation step
    python -m bench.accelerator --smoke         # tiny sizes on any backend (kernels interpreted on a CPU)

The case is the seed checkpoint's pretraining step: ``LongformerForMaskedLM``, base size (hidden 768,
12 heads, FFN 3072, vocab 50265), 12 layers, batch 8 of 4096 tokens in the seed's layout (32 blocks
of 128 tokens, each starting with ``<s>``/``</s>`` and padded INSIDE the sequence, global attention on
every block start), window 128, MLM masking 15%, bfloat16 compute with float32 parameters, AdamW
(lr 1e-4, weight decay 0.01), dropout 0.1 (attention dropout 0 for an implementation that refuses it;
the table says which). ``transformers``' ``LongformerForMaskedLM`` runs the same batch with the same
optimizer under ``torch.autocast(bfloat16)`` (float32 parameters, as HF's Trainer with ``bf16=True``).

Per implementation it reports tokens/s, the step time, model FLOPs utilisation (MFU = the exact
model's FLOPs (``bench.common.forward_flops`` plus the MLM head, x3 for the train step) / time / the
chip's nominal dense bfloat16 peak, looked up from the device name or given with ``--peak-tflops``),
the ratio to ``transformers``, and the attention kernel's own TFLOP/s: the band plus global columns of
one layer (batch x 12 heads x 4096 x 64, w = 64, 32 global slots) forward and backward, counted as
3.5 x ``4 B H L (2w + 1 + G) D`` (the useful products; a backward pass is 2.5 forward ones).

Every measurement runs in a fresh process (JAX's and PyTorch's allocators do not share the device);
the table goes to ``bench/results_accelerator.md`` and every number to ``results_accelerator.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from bench import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FULL = dict(batch=8, length=4096, block=128, window=128, layers=12, steps=5, warmup=2, dtype="bfloat16")
SMOKE = dict(
    batch=2,
    length=128,
    block=32,
    window=16,
    layers=1,
    steps=1,
    warmup=1,
    dtype="float32",
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=120,
)
DROPOUT = 0.1
MLM_PROBABILITY = 0.15
# Nominal dense bfloat16 peaks (vendor datasheets), by a piece of the device's name.
PEAK_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}
GOAL_MFU = 0.40
GOAL_SPEEDUP = 2.0


# ---------------------------------------------------------------------------------------- the case
def sizes(spec: dict) -> dict:
    """The model's sizes (base unless the spec says otherwise) and the FLOP-count case."""
    base = {k: spec.get(k, common.BASE[k]) for k in common.BASE}
    G = spec["length"] // spec["block"]
    return dict(
        base,
        num_hidden_layers=spec["layers"],
        attention_window=spec["window"],
        max_position_embeddings=spec["length"] + base["pad_token_id"] + 2,
        globals=G,
    )


def seed_layout_batch(spec: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids, masks and MLM labels in the seed's layout (int32), the same for every implementation."""
    s = sizes(spec)
    B, L, blk, V = spec["batch"], spec["length"], spec["block"], s["vocab_size"]
    pad, bos, eos, mask_id = s["pad_token_id"], s["bos_token_id"], s["eos_token_id"], V - 1
    rng = np.random.default_rng(seed)
    ids = np.full((B, L), pad, np.int64)
    am = np.zeros((B, L), np.int64)
    gm = np.zeros((B, L), np.int64)
    for b in range(B):
        for n in range(L // blk):
            start, fill = n * blk, int(rng.integers(blk // 2, blk))  # at most blk - 1 tokens, then pads
            ids[b, start] = bos if n == 0 else eos
            ids[b, start + 1 : start + fill] = rng.integers(3, mask_id, fill - 1)
            am[b, start : start + fill] = 1
            gm[b, start] = 1
    candidates = (am == 1) & (gm == 0)
    chosen = candidates & (rng.random((B, L)) < MLM_PROBABILITY)
    labels = np.where(chosen, ids, -100)
    r = rng.random((B, L))
    ids = np.where(chosen & (r < 0.8), mask_id, ids)
    ids = np.where(chosen & (r >= 0.8) & (r < 0.9), rng.integers(3, mask_id, (B, L)), ids)
    arrays = dict(input_ids=ids, attention_mask=am, global_attention_mask=gm, labels=labels)
    return {k: v.astype(np.int32) for k, v in arrays.items()}


def step_flops(spec: dict) -> float:
    """Model FLOPs of one train step: 3 x (encoder forward + MLM head: dense, decoder)."""
    s = sizes(spec)
    case = dict(s, length=spec["length"], batch=spec["batch"], layers=spec["layers"], window=spec["window"])
    E, V = s["hidden_size"], s["vocab_size"]
    head = 2 * spec["batch"] * spec["length"] * (E * E + E * V)
    return 3.0 * (common.forward_flops(dict(case, mode="fwd")) + head)


def attention_flops(spec: dict) -> float:
    """Useful FLOPs of one layer's band + global columns, forward and backward (3.5 x forward)."""
    s = sizes(spec)
    H = s["num_attention_heads"]
    D = s["hidden_size"] // H
    cols = spec["window"] + 1 + s["globals"]
    return 3.5 * 4.0 * spec["batch"] * H * spec["length"] * cols * D


# ---------------------------------------------------------------------------------------- JAX worker
@contextlib.contextmanager
def routed_band(impl: str):
    """Count the layers whose band the model traced through ``impl``'s kernel; yields that list.

    The model picks its band by ``LongformerConfig.attention_implementation`` (see ``jax_config``);
    this only wraps the kernel module's entry point so that the table can show the kernel ran."""
    from longformer_jax.kernels import pallas_gpu, splash

    calls = []
    module = {"splash": splash, "pallas-gpu": pallas_gpu}.get(impl)
    if module is None:
        yield calls
        return
    original = module.band_attention

    def counted(*args, **kwargs):
        calls.append(impl)
        return original(*args, **kwargs)

    module.band_attention = counted
    try:
        yield calls
    finally:
        module.band_attention = original


def jax_config(spec: dict):
    import longformer_jax as lj

    s = sizes(spec)
    kw = {k: v for k, v in s.items() if k != "globals"}
    cfg = lj.LongformerConfig(
        **kw, dtype=spec["dtype"], hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=spec["attention_dropout"]
    )
    return cfg.replace(attention_implementation=spec["impl"])


def jax_train_step(spec: dict) -> dict:
    """Compile and time the MLM train step with ``spec['impl']``."""
    import jax
    import optax

    import longformer_jax as lj

    cfg = jax_config(spec)
    model = lj.LongformerForMaskedLM(cfg)
    batch = {k: jax.numpy.asarray(v) for k, v in seed_layout_batch(spec).items()}
    G = sizes(spec)["globals"]
    ids = batch["input_ids"][:, : spec["window"]]

    def init(r):
        return model.init(r, ids, global_attention_mask=jax.numpy.zeros_like(ids), num_global_slots=0)["params"]

    params = jax.jit(init)(jax.random.PRNGKey(0))
    tx = optax.adamw(1e-4, weight_decay=0.01)

    def train_step(params, opt_state, batch, rng):
        def loss_fn(p):
            out = model.apply({"params": p}, **batch, deterministic=False, num_global_slots=G, rngs={"dropout": rng})
            return out.loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, tx.init(params), batch, rng).compile()
    compile_s = time.perf_counter() - t0
    state = {"params": params, "opt": tx.init(params)}
    del params

    def run():
        p, o, loss = compiled(state["params"], state["opt"], batch, rng)
        loss.block_until_ready()
        state["params"], state["opt"], state["loss"] = p, o, float(loss)

    times = common.time_calls(run, spec["steps"], spec["warmup"])
    return {"times_s": times, "compile_s": compile_s, "loss": state["loss"]}


def jax_attention(spec: dict) -> dict:
    """Forward + backward of one layer's band attention alone (no dropout), timed."""
    import jax
    import jax.numpy as jnp

    from longformer_jax import attention, kernels

    s = sizes(spec)
    B, H, L = spec["batch"], s["num_attention_heads"], spec["length"]
    D = s["hidden_size"] // H
    mask = seed_layout_batch(spec)
    mask = jnp.asarray(mask["attention_mask"] * (mask["global_attention_mask"] + 1))
    slots = attention.global_slots(mask == 2, s["globals"])
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    q, k, v = (jax.random.normal(kk, (B, H, L, D), jnp.float32).astype(spec["dtype"]) for kk in keys)
    q = q / jnp.asarray(np.sqrt(D), q.dtype)

    def loss(q, k, v):
        out = kernels.band_attention(spec["impl"], q, k, v, mask, spec["window"] // 2, slots)
        return jnp.sum(out.astype(jnp.float32))

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    times = common.time_calls(lambda: jax.block_until_ready(f(q, k, v)), max(spec["steps"], 3), spec["warmup"])
    return {"times_s": times}


def jax_worker(spec: dict) -> dict:
    import jax

    from longformer_jax import kernels

    backend = jax.default_backend()
    interpret = spec["impl"] != "blocked" and backend not in kernels.NATIVE_BACKENDS[spec["impl"]]
    out = {"device": jax.devices()[0].device_kind, "backend": backend, "interpret": interpret}
    with kernels.interpret_mode(interpret), routed_band(spec["impl"]) as calls:
        out["train"] = jax_train_step(spec)
        out["routed_layers"] = len(calls)  # layers traced through the kernel
        out["attention"] = jax_attention(spec)
    return out


# ---------------------------------------------------------------------------------------- PyTorch worker
def torch_worker(spec: dict) -> dict:
    """``transformers``' LongformerForMaskedLM: autocast bfloat16 (pure bfloat16 if autocast fails)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    dev = "cuda" if spec["device"] == "gpu" and torch.cuda.is_available() else "cpu"
    s = sizes(spec)
    cfg = transformers.LongformerConfig(
        **{k: v for k, v in s.items() if k != "globals"},
        hidden_dropout_prob=DROPOUT,
        attention_probs_dropout_prob=DROPOUT,
    )
    torch.manual_seed(0)
    batch = {k: torch.tensor(v, dtype=torch.long, device=dev) for k, v in seed_layout_batch(spec).items()}
    dtype = getattr(torch, spec["dtype"])

    def measure(precision: str) -> dict:  # "autocast", "pure" (all in dtype) or "float32"
        model = transformers.LongformerForMaskedLM(cfg).to(dev)
        if precision == "pure":
            model = model.to(dtype)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        state = {}

        def run():
            with torch.autocast(device_type=dev, dtype=dtype, enabled=precision == "autocast"):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev == "cuda":
                torch.cuda.synchronize()
            state["loss"] = float(loss.detach())

        times = common.time_calls(run, spec["steps"], spec["warmup"])
        return {"times_s": times, "precision": precision, "loss": state["loss"]}

    if dtype == torch.float32:
        train = measure("float32")
        return {
            "device": _torch_device_name(torch, dev),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "train": train,
        }
    try:
        train = measure("autocast")
    except Exception as e:  # noqa: BLE001 - fall back to what surely runs, and say so
        train = measure("pure")
        train["autocast_error"] = f"{type(e).__name__}: {e}"[:300]
    return {
        "device": _torch_device_name(torch, dev),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "train": train,
    }


def _torch_device_name(torch, dev: str) -> str:
    return torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"


# ---------------------------------------------------------------------------------------- driver
def run_worker(spec: dict, in_process: bool, timeout: float) -> dict:
    if in_process:
        try:
            return (torch_worker if spec["impl"] == "transformers" else jax_worker)(spec)
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            return {"error": f"{type(e).__name__}: {e}"[:500]}
    cmd = [sys.executable, "-m", "bench.accelerator", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def median(xs):
    return float(np.median(np.asarray(xs))) if xs else float("nan")


def peak_flops(device_kind: str, given_tflops: float | None) -> float | None:
    if given_tflops:
        return given_tflops * 1e12
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def summarise(raw: dict) -> list[dict]:
    """One row per implementation: step time, tokens/s, MFU, ratio to transformers, attention TFLOP/s."""
    spec = raw["spec"]
    tokens = spec["batch"] * spec["length"]
    flops = step_flops(spec)
    peak = raw.get("peak_flops")
    rows = []
    for r in raw["results"]:
        res = r["result"]
        row = {"impl": r["impl"], "attention_dropout": r["attention_dropout"]}
        if "error" in res:
            rows.append(dict(row, error=res["error"]))
            continue
        t = median(res["train"]["times_s"])
        row.update(
            step_s=t,
            tokens_per_s=tokens / t,
            model_tflops_per_s=flops / t / 1e12,
            mfu=(flops / t / peak) if peak else None,
            compile_s=res["train"].get("compile_s"),
            interpret=res.get("interpret", False),
            precision=res["train"].get("precision"),
        )
        if "attention" in res:
            row["attention_tflops_per_s"] = attention_flops(spec) / median(res["attention"]["times_s"]) / 1e12
        rows.append(row)
    torch_row = next((x for x in rows if x["impl"] == "transformers" and "error" not in x), None)
    for x in rows:
        if torch_row and "error" not in x:
            x["vs_transformers"] = x["tokens_per_s"] / torch_row["tokens_per_s"]
    return rows


def _fmt(x, pattern: str, missing: str = "-") -> str:
    return missing if x is None else pattern.format(x)


def markdown(raw: dict, rows: list[dict]) -> str:
    spec, m = raw["spec"], raw["machine"]
    s = sizes(spec)
    peak = raw.get("peak_flops")
    smoke = " (smoke sizes)" if spec["smoke"] else ""
    layers = f"{spec['layers']} layer{'s' if spec['layers'] != 1 else ''}"
    lines = [
        f"MLM train step, {m['date']}, {m['device']} ({m['backend']}); JAX {m['jax']}, "
        f"PyTorch {m.get('torch') or '-'}, transformers {m.get('transformers') or '-'}. "
        f"Command: `{raw['command']}`{smoke}.",
        "",
        f"Hidden {s['hidden_size']}, {s['num_attention_heads']} heads, FFN {s['intermediate_size']}, vocab "
        f"{s['vocab_size']}, {layers}; batch {spec['batch']} x {spec['length']} tokens in the seed's "
        f"layout ({spec['length'] // spec['block']} blocks of {spec['block']}, padded inside, {s['globals']} global "
        f"tokens per sequence), window {spec['window']}; {spec['dtype']} compute, float32 parameters, AdamW, dropout "
        f"{DROPOUT}. MFU against {_fmt(peak and peak / 1e12, '{:.0f} TFLOP/s', 'no known peak (pass --peak-tflops)')}.",
        "",
        "| implementation | step ms | tokens/s | MFU | vs transformers | attention fwd+bwd TFLOP/s | attention dropout "
        "| compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error'][:160]} | | | | | | |")
            continue
        name = r["impl"] + (" (interpreted)" if r.get("interpret") else "")
        if r["impl"] == "transformers":
            name += f" ({r.get('precision')})"
        lines.append(
            f"| {name} | {r['step_s'] * 1e3:,.1f} | {r['tokens_per_s']:,.0f} | {_fmt(r['mfu'], '{:.1%}')} "
            f"| {_fmt(r.get('vs_transformers'), '{:.2f}x')} | {_fmt(r.get('attention_tflops_per_s'), '{:.3g}')} "
            f"| {r['attention_dropout']} | {_fmt(r.get('compile_s'), '{:.0f}')} |"
        )
    lines += ["", *goal_lines(rows, raw)]
    return "\n".join(lines) + "\n"


def goal_lines(rows: list[dict], raw: dict) -> list[str]:
    if raw["spec"]["smoke"]:
        return ["Smoke sizes: a check that the benchmark runs; the goals apply to the full case only."]
    ok = [r for r in rows if "error" not in r and r["impl"] != "transformers"]
    if not ok:
        return ["Goals: nothing measured."]
    best = max(ok, key=lambda r: r["tokens_per_s"])
    out = [f"Fastest JAX implementation: `{best['impl']}`."]
    if best["mfu"] is not None:
        met = "met" if best["mfu"] >= GOAL_MFU else "not met"
        out.append(f"- MFU {best['mfu']:.1%} (goal >= {GOAL_MFU:.0%} on an H200): {met}.")
    if best.get("vs_transformers") is not None:
        met = "met" if best["vs_transformers"] >= GOAL_SPEEDUP else "not met"
        out.append(f"- {best['vs_transformers']:.2f}x transformers' tokens/s (goal >= {GOAL_SPEEDUP:.0f}x): {met}.")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("gpu", "tpu", "cpu"), default=None, help="default: JAX's backend")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; kernels interpreted on a CPU)")
    p.add_argument(
        "--implementations",
        default=None,
        help="comma-separated (default: those the backend runs compiled; with --smoke all)",
    )
    p.add_argument("--no-torch", action="store_true", help="leave out transformers")
    p.add_argument("--peak-tflops", type=float, default=None, help="nominal dense bf16 peak for MFU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; smoke 1)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results_accelerator.md"))
    p.add_argument("--in-process", action="store_true", help="run the measurements in this process")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement process")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all measurements together")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan(args, backend: str) -> tuple[dict, list[str]]:
    from longformer_jax import kernels

    spec = dict(SMOKE if args.smoke else FULL, smoke=bool(args.smoke), device=args.device or backend)
    if args.steps:
        spec["steps"] = args.steps
    if args.implementations:
        impls = [x.strip() for x in args.implementations.split(",") if x.strip()]
    else:
        impls = list(kernels.IMPLEMENTATIONS[:-1] if args.smoke else kernels.available_implementations(backend))
    for name in impls:
        if name != "transformers":
            kernels.resolve_implementation(name)  # a ValueError naming the choices for a typo
    if not args.no_torch and spec["device"] != "tpu" and "transformers" not in impls:
        impls.append("transformers")  # (on a TPU PyTorch would run on the host: no row)
    if not args.implementations:  # the kernels and transformers first: a run cut short keeps the goals' rows
        impls.sort(key=lambda n: n == "blocked")
    return spec, impls


def machine(backend: str) -> dict:
    import importlib.metadata as md

    import jax

    def ver(n):
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": jax.devices()[0].device_kind,
        "backend": backend,
        "jax": ver("jax"),
        "torch": ver("torch"),
        "transformers": ver("transformers"),
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        common.emit(torch_worker(spec) if spec["impl"] == "transformers" else jax_worker(spec))
        return 0
    import jax

    from longformer_jax import kernels

    backend = {"cuda": "gpu", "rocm": "gpu"}.get(jax.default_backend(), jax.default_backend())
    try:
        if args.device and args.device != backend:
            raise ValueError(
                f"--device {args.device} asked for, but JAX's backend is {backend!r}: install a JAX "
                f"for that accelerator (bash bench/accelerator.sh does), or leave --device out."
            )
        spec, impls = plan(args, backend)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raw = {
        "command": "python -m bench.accelerator " + " ".join(argv if argv is not None else sys.argv[1:]),
        "spec": spec,
        "machine": machine(backend),
        "results": [],
    }
    raw["peak_flops"] = peak_flops(raw["machine"]["device"], args.peak_tflops)
    deadline = time.perf_counter() + args.budget
    for impl in impls:
        dropout = 0.0 if impl not in ("transformers", *kernels.WITH_DROPOUT) else DROPOUT
        t0 = time.perf_counter()
        left = deadline - t0
        if left < 30:
            res = {"error": f"not run: the time budget (--budget {args.budget:.0f} s) was spent"}
        else:
            res = run_worker(dict(spec, impl=impl, attention_dropout=dropout), args.in_process, min(args.timeout, left))
        print(
            f"[{time.strftime('%H:%M:%S')}] {impl}: {res.get('error') or 'done'} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        raw["results"].append({"impl": impl, "attention_dropout": dropout, "result": res})
        if impl == "transformers" and "error" not in res:
            raw["machine"].update(torch=res["torch"], transformers=res["transformers"])
        text = write_report(raw, args.out)  # after every row: a run cut short keeps what it measured
    print(text)
    return 0 if all("error" not in r for r in raw["rows"]) else 1


def write_report(raw: dict, out: str) -> str:
    raw["rows"] = summarise(raw)
    text = markdown(raw, raw["rows"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(raw, f, indent=1)
    return text


if __name__ == "__main__":
    sys.exit(main())
