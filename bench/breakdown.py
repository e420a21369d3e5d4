"""Where the time of the JAX model goes on this machine: ``python -m bench.breakdown``.

Prints three markdown tables (and writes them to ``bench/breakdown.md``):

1. Matrix-product FLOP/s of the shapes the model runs: the large dense products of the
   projections and the feed-forward, and the batched small products of the blocked band
   (one ``C x D x (C + 2w)`` product per head and query block).
2. The band attention alone (one layer, 12 heads of 64, 4096 tokens): forward, forward + backward,
   with and without attention dropout, against the time its FLOPs take at the large-product rate.
3. The 2-layer base-size model (4096 tokens, float32) with its band attention replaced by
   ``q + k + v``: what the rest of the model costs, so the attention's share of a forward pass and
   of a training step is the difference.

Run as a program it restarts itself with the environment of ``bench.run``'s JAX workers (the
malloc settings and the training XLA flags), so the numbers compare with the main benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _reexec_with_worker_env() -> None:
    """Start this program again with bench.run's worker environment (glibc reads MALLOC_* at start)."""
    from bench import common
    from longformer_jax.compile_options import training_xla_flags

    env = dict(os.environ, **common.MALLOC_ENV)
    env["XLA_FLAGS"] = training_xla_flags(env.get("XLA_FLAGS", ""))
    env["LONGFORMER_JAX_BENCH_WORKER"] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "bench.breakdown", *sys.argv[1:]], env)


def _best_ms(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def matmul_table(reps: int) -> list[str]:
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    rows = []

    def dense(name, m, k, n):
        a, b = jax.random.normal(key, (m, k)), jax.random.normal(key, (k, n))
        f = jax.jit(lambda a, b: a @ b)
        ms = _best_ms(lambda: f(a, b), reps)
        rows.append((name, f"{m}x{k} @ {k}x{n}", 1, 2 * m * k * n, ms))

    def band(name, w, C, spec):
        H, N, D, K = 12, 4096 // C, 64, C + 2 * w
        q = jax.random.normal(key, (H, N, C, D))
        kw = jax.random.normal(key, (H, N, K, D))
        s = jax.random.normal(key, (H, N, C, K))
        lhs, rhs = {"scores": (q, kw), "values": (s, kw), "value grad": (s, q)}[name]
        f = jax.jit(lambda a, b: jnp.einsum(spec, a, b))
        ms = _best_ms(lambda: f(lhs, rhs), reps)
        shape = {"scores": f"{C}x{D} @ {D}x{K}", "values": f"{C}x{K} @ {K}x{D}", "value grad": f"{K}x{C} @ {C}x{D}"}
        rows.append((f"band {name}, window {2 * w}", shape[name], H * N, 2 * H * N * C * D * K, ms))

    dense("projection", 4096, 768, 768)
    dense("feed-forward in", 4096, 768, 3072)
    dense("feed-forward out", 4096, 3072, 768)
    for w, C in ((256, 128), (64, 64)):
        band("scores", w, C, "hncd,hnkd->hnck")
        band("values", w, C, "hnck,hnkd->hncd")
        band("value grad", w, C, "hnck,hncd->hnkd")
    out = [
        "| product | shape | products per call | GFLOP | ms | GFLOP/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, shape, count, flops, ms in rows:
        out.append(f"| {name} | {shape} | {count:,} | {flops / 1e9:.2f} | {ms:.1f} | {flops / ms / 1e6:,.0f} |")
    return out


def attention_table(reps: int, peak: float) -> list[str]:
    import jax
    import jax.numpy as jnp

    from longformer_jax import attention as A

    L, H, D = 4096, 12, 64
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (1, H, L, D)) / 8
    k = jax.random.normal(ks[1], (1, H, L, D))
    v = jax.random.normal(ks[2], (1, H, L, D))
    out = [
        "| window | globals | dropout | forward ms | forward + backward ms | forward at the large-product rate ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for window, G in ((512, 0), (128, 32)):
        w = window // 2
        mask = jnp.ones((1, L), jnp.int32)
        slots = None
        if G:
            is_global = jnp.zeros((1, L), bool).at[:, :: L // G].set(True)
            mask = jnp.where(is_global, 2, 1)
            slots = A.global_slots(is_global, G)
        ideal = 2 * 2 * L * H * (2 * w + 1 + G) * D / peak * 1e3
        for rate in (0.0, 0.1):

            def f(q, k, v, rate=rate, mask=mask, slots=slots, w=w):
                rng = ks[3] if rate else None
                return A.lean_band_attention_heads(q, k, v, mask, w, slots, dropout_rate=rate, dropout_rng=rng)

            fwd = jax.jit(f)
            both = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * v), argnums=(0, 1, 2)))
            t_f = _best_ms(lambda fwd=fwd: fwd(q, k, v), reps)
            t_b = _best_ms(lambda both=both: both(q, k, v), reps)
            out.append(f"| {window} | {G} | {rate} | {t_f:.0f} | {t_b:.0f} | {ideal:.0f} |")
    return out


def model_table(reps: int) -> list[str]:
    import jax.numpy as jnp

    from bench import common, jax_case
    from longformer_jax import attention as A

    out = [
        "| window | globals | step | model ms | without the band ms | band's share |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    original = A.lean_band_attention_heads
    for window, G in ((512, 0), (128, 32)):
        case = dict(
            framework="jax",
            length=4096,
            window=window,
            globals=G,
            layers=2,
            batch=1,
            modes=["fwd", "train"],
            reps={"fwd": reps, "train": max(2, reps // 2)},
        )
        arrays = {k: jnp.asarray(v, jnp.int32) for k, v in common.inputs(case).items()}
        times = {}
        for variant in ("model", "no band"):
            A.lean_band_attention_heads = original if variant == "model" else (lambda q, k, v, *a, **kw: q + k + v)
            for mode in ("fwd", "train"):
                r = jax_case._measure(case, mode, arrays, common.PeakRSS())
                times[variant, mode] = min(r["times_s"]) * 1e3
        A.lean_band_attention_heads = original
        for mode, label in (("fwd", "forward"), ("train", "train step")):
            full, rest = times["model", mode], times["no band", mode]
            out.append(f"| {window} | {G} | {label} | {full:,.0f} | {rest:,.0f} | {(full - rest) / full:.0%} |")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement (the best is kept)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "breakdown.md"))
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    import jax

    jax.config.update("jax_platforms", "cpu")
    mm = matmul_table(args.reps)
    peak = max(float(line.split("|")[-2].replace(",", "")) for line in mm[2:5]) * 1e9
    sections = [
        ("Matrix products (float32)", mm),
        ("Band attention alone, one layer, 4096 tokens", attention_table(args.reps, peak)),
        ("The 2-layer model at 4096 tokens, with and without its band attention", model_table(args.reps)),
    ]
    text = [f"`python -m bench.breakdown` on {os.cpu_count()} CPU cores, JAX {jax.__version__}.", ""]
    for title, table in sections:
        text += [f"**{title}**", "", *table, ""]
    report = "\n".join(text)
    with open(args.out, "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    if os.environ.get("LONGFORMER_JAX_BENCH_WORKER") != "1":
        _reexec_with_worker_env()
    main()
