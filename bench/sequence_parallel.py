"""Sequence parallelism: per-device memory, and equality with one device: ``python -m bench.sequence_parallel``.

One document of ``--length`` tokens (default 32,768) through a small masked-LM Longformer, its tokens
split over n = 1, 2, 4, 8 CPU devices (a ("data", "fsdp", "sequence") mesh of 1 x 1 x n; n = 1 is
the plain one-device program). For each n the compiled program of a forward pass (the logits) and
of a training step's gradient (``value_and_grad`` of the MLM loss) is asked for its memory
(``compiled.memory_analysis()``, per device: arguments, outputs and temporaries) and the table is
printed in markdown: the temporaries are the activations, which the split divides by n; the
arguments and outputs hold the parameters (and their gradients), which every device keeps whole.
With ``--check`` every program also runs, and its logits and gradients are compared with one
device's (max absolute difference, and the difference over the largest value). ``--dropout P``
measures the programs with hidden and attention dropout P (then only the memory compares);
``--causal`` and ``--dilation D`` measure those attention patterns.

Run as a program it restarts itself with 8 host-platform devices (XLA reads XLA_FLAGS once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _reexec_with_devices(count: int) -> None:
    """Start this program again with ``count`` CPU devices, unless JAX already has them."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICES_FLAG in flags:
        return
    env = dict(os.environ, XLA_FLAGS=f"{flags} {DEVICES_FLAG}={count}".strip(), JAX_PLATFORMS="cpu")
    os.execve(sys.executable, [sys.executable, "-m", "bench.sequence_parallel", *sys.argv[1:]], env)


def build_case(
    length: int,
    hidden: int,
    layers: int,
    window: int,
    globals_per_row: int,
    dropout: float = 0.0,
    seed: int = 0,
    causal: bool = False,
    dilation: int = 1,
):
    """(model, params, batch) of one document: pads at the end, global tokens spread over the whole length."""
    import numpy as np

    import longformer_jax as lj

    cfg = lj.LongformerConfig(
        vocab_size=128,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16),
        intermediate_size=4 * hidden,
        attention_window=window,
        max_position_embeddings=length + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        causal_attention=causal,
        attention_dilation=dilation,
    )
    model = lj.LongformerForMaskedLM(cfg)
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, cfg.vocab_size, (1, length)).astype(np.int32)
    am = np.ones((1, length), np.int32)
    am[:, length - length // 64 :] = 0  # a padded tail
    gm = np.zeros((1, length), np.int32)
    gm[:, np.linspace(0, length - length // 64 - 1, globals_per_row).astype(int)] = 1
    labels = np.where((rng.random((1, length)) < 0.15) & (am == 1) & (gm == 0), ids, -100).astype(np.int32)
    batch = dict(
        input_ids=np.where(am == 1, ids, cfg.pad_token_id).astype(np.int32),
        attention_mask=am,
        global_attention_mask=gm,
        labels=labels,
    )
    return model, lj.init_params(model, 0), batch


def programs(model, num_global_slots: int):
    """(forward, gradient): the logits, and ``value_and_grad`` of the mean MLM loss, of (params, batch).

    With dropout in the model's config, both apply it (key 0)."""
    import jax

    from longformer_jax.losses import cross_entropy

    dropout = model.config.hidden_dropout_prob > 0 or model.config.attention_probs_dropout_prob > 0

    def forward(params, batch):
        masks = {k: batch[k] for k in ("attention_mask", "global_attention_mask")}
        rngs = {"dropout": jax.random.PRNGKey(0)} if dropout else None
        return model.apply(
            {"params": params},
            batch["input_ids"],
            **masks,
            num_global_slots=num_global_slots,
            deterministic=not dropout,
            rngs=rngs,
        ).logits

    def loss(params, batch):
        return cross_entropy(forward(params, batch), batch["labels"])

    return forward, jax.value_and_grad(loss)


def memory_mb(compiled) -> dict[str, float]:
    """Per-device arguments, outputs, temporaries and their total (MB) of a compiled program."""
    m = compiled.memory_analysis()
    out = {"args": m.argument_size_in_bytes, "out": m.output_size_in_bytes, "temp": m.temp_size_in_bytes}
    out["total"] = out["args"] + out["out"] + out["temp"] - m.alias_size_in_bytes
    return {k: v / 2**20 for k, v in out.items()}


def measure(n: int, case, num_global_slots: int, check: bool) -> dict:
    """Memory of both programs on a 1 x 1 x n mesh (and, with ``check``, their results)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from longformer_jax import sharding as shd

    model, params, batch = case
    mesh = shd.make_mesh(1, 1, n, devices=jax.devices()[:n])
    tokens = NamedSharding(mesh, P(shd.BATCH_AXES, shd.SEQUENCE_AXIS))
    batch = jax.device_put(batch, tokens)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    row: dict = {"n": n}
    with jax.set_mesh(mesh):
        for name, fn in zip(("forward", "grad"), programs(model, num_global_slots), strict=True):
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(params, batch).compile()
            row[name] = memory_mb(compiled)
            row[name]["compile_s"] = time.perf_counter() - t0
            if check:
                row[name + "_result"] = jax.device_get(compiled(params, batch))
    return row


def errors(got, want) -> tuple[float, float]:
    """(max absolute difference, that over the largest absolute value) over every leaf."""
    import jax
    import numpy as np

    diffs = [
        float(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max())
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ]
    scale = max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want))
    return max(diffs), max(diffs) / scale


def table(rows: list[dict], check: bool) -> list[str]:
    """The markdown table: per-device MB of both programs, their share of one device's, and the errors."""
    base = rows[0]
    head = ["n"]
    for name in ("forward", "grad step"):
        head += [f"{name}: args", "out", "temp", "total", "temp / 1 dev", "total / 1 dev"]
    if check:
        head += ["logits: max abs diff", "loss: abs diff", "grads: max abs diff", "grads: diff / max abs grad"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["n"])]
        for name in ("forward", "grad"):
            m = r[name]
            cells += [
                f"{m['args']:.1f}",
                f"{m['out']:.1f}",
                f"{m['temp']:.1f}",
                f"{m['total']:.1f}",
                f"{m['temp'] / base[name]['temp']:.3f}",
                f"{m['total'] / base[name]['total']:.3f}",
            ]
        if check:
            (loss, grads), (base_loss, base_grads) = r["grad_result"], base["grad_result"]
            cells += [
                f"{errors(r['forward_result'], base['forward_result'])[0]:.1e}",
                f"{errors(loss, base_loss)[0]:.1e}",
                *(f"{e:.1e}" for e in errors(grads, base_grads)),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.sequence_parallel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--length", type=int, default=32768, help="tokens of the document (default 32768)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (heads of 16) (default 64)")
    p.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    p.add_argument("--window", type=int, default=64, help="full attention window (default 64)")
    p.add_argument("--globals", type=int, default=8, dest="globals_per_row", help="global tokens (default 8)")
    p.add_argument("--devices", default="1,2,4,8", help="sequence-axis sizes, comma-separated (default 1,2,4,8)")
    p.add_argument("--check", action="store_true", help="also run every program and compare with one device")
    p.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout (default 0)")
    p.add_argument("--causal", action="store_true", help="causal sliding windows (causal_attention)")
    p.add_argument("--dilation", type=int, default=1, help="dilation of every head's window (default 1)")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.devices.split(",")]
    _reexec_with_devices(max(sizes))
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from longformer_jax.inputs import global_slot_bucket

    case = build_case(
        args.length,
        args.hidden,
        args.layers,
        args.window,
        args.globals_per_row,
        args.dropout,
        causal=args.causal,
        dilation=args.dilation,
    )
    slots = global_slot_bucket(args.globals_per_row)
    rows = [measure(n, case, slots, args.check) for n in sizes]
    print(
        f"{args.length} tokens, hidden {args.hidden}, {args.layers} layers, window {args.window}, "
        f"{args.globals_per_row} global tokens, dropout {args.dropout}{', causal' if args.causal else ''}"
        f"{f', dilation {args.dilation}' if args.dilation > 1 else ''}; MB per device "
        f"({jax.devices()[0].platform}, JAX {jax.__version__})"
    )
    print("\n".join(table(rows, args.check)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
