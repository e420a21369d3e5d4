"""JAX side of one benchmark case, run in its own process: ``python -m bench.jax_case '<case json>'``.

``framework`` is ``jax`` (this project's Longformer) or ``dense`` (the same encoder with plain
O(L^2) softmax attention, the baseline that shows where the band pays off). The masked-LM case
(``task="mlm"``) trains ``LongformerForMaskedLM`` with its LM head at the masked positions only
(``masked_positions`` / ``masked_labels``), as ``python -m train.pretrain`` does. Special cases:
``{"kind": "matmul"}`` measures the matrix-product FLOP/s of this machine, ``{"kind": "compile"}``
only compiles a forward pass (the 12-layer compile time).
"""

from __future__ import annotations

import gc
import json
import sys
import time

import numpy as np

from bench import common


def _setup(device: str):
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    return jax


def matmul_flops(dtype: str = "float32", device: str = "cpu") -> dict:
    """The best FLOP/s of large ``jnp.dot`` products (a square one and the feed-forward shape)."""
    jax = _setup(device)
    import jax.numpy as jnp

    n = 4096 if device == "cpu" else 16384
    shapes = [(n, n, n), (4096, 768, 3072), (4096, 3072, 768)] if device == "cpu" else [(n, n, n)]
    best = {}
    for m, k, nn_ in shapes:
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, nn_), jnp.float32).astype(dtype)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        reps = 3 if m * k * nn_ >= 4096**3 else 10
        t = common.time_calls(lambda f=f, a=a, b=b: f(a, b).block_until_ready(), reps)
        best[f"{m}x{k}x{nn_}"] = 2.0 * m * k * nn_ / min(t)
    return {"kind": "matmul", "dtype": dtype, "flops_per_s": max(best.values()), "by_shape": best}


# ---------------------------------------------------------------------------------------- models
def _config(case: dict):
    import longformer_jax as lj

    kw = common.model_kwargs(case)
    extra = {}
    if case.get("block_size"):
        extra["attention_block_size"] = case["block_size"]
    return lj.LongformerConfig(
        **kw,
        num_labels=common.NUM_LABELS,
        dtype=case.get("dtype", "float32"),
        remat=bool(case.get("remat", False)),
        scan_layers=bool(case.get("scan_layers", False)),
        **extra,
    )


def _dense_encoder(cfg):
    """The encoder with full softmax attention (same sizes, local projections only)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from longformer_jax import modeling as M
    from longformer_jax.dropout import Dropout
    from longformer_jax.inputs import position_ids_from_input_ids

    class DenseLayer(nn.Module):
        config: object
        deterministic: bool = True

        @nn.compact
        def __call__(self, h, mask_BxL):
            c = self.config
            B, L, E = h.shape
            H, D = c.num_attention_heads, c.head_dim

            def heads(x):
                return x.reshape(B, L, H, D).transpose(0, 2, 1, 3)

            q = heads(M.dense(c, E, "query")(h)) / np.sqrt(D)
            k = heads(M.dense(c, E, "key")(h))
            v = heads(M.dense(c, E, "value")(h))
            s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
            s = jnp.where(mask_BxL[:, None, None, :] > 0, s, jnp.finfo(jnp.float32).min)
            p = jax.nn.softmax(s, axis=-1)
            p = Dropout(c.attention_probs_dropout_prob)(p, deterministic=self.deterministic)
            a = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v).transpose(0, 2, 1, 3).reshape(B, L, E)
            a = M.LongformerDenseOutput(c, self.deterministic, name="attention_output")(a, h)
            x = M.LongformerIntermediate(c, name="intermediate")(a)
            return M.LongformerDenseOutput(c, self.deterministic, name="output")(x, a)

    class DenseTokenClassifier(nn.Module):
        config: object

        @nn.compact
        def __call__(self, input_ids, attention_mask, labels=None, deterministic=True):
            c = self.config
            pos = position_ids_from_input_ids(input_ids, c.pad_token_id)
            h = M.LongformerEmbeddings(c, name="embeddings")(
                input_ids, jnp.zeros_like(input_ids), pos, None, deterministic
            )
            for i in range(c.num_hidden_layers):
                h = DenseLayer(c, deterministic, name=f"layer_{i}")(h, attention_mask)
            if labels is None:
                return h
            h = Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
            logits = M.dense(c, c.num_labels, "classifier")(h).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, -1)
            return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))

    return DenseTokenClassifier(cfg)


def _functions(case: dict, mode: str):
    """(init_fn(rng) -> params, apply_fn(params, batch, rng) -> output) for the case and mode."""
    import jax.numpy as jnp

    import longformer_jax as lj

    cfg = _config(case)
    G = case["globals"]
    if mode == "train":
        cfg = cfg.replace(hidden_dropout_prob=common.DROPOUT, attention_probs_dropout_prob=common.DROPOUT)
    if case["framework"] == "dense":
        model = _dense_encoder(cfg)

        def init(rng, batch):
            small = {k: v[:, :8] for k, v in batch.items()}
            return model.init(rng, small["input_ids"], small["attention_mask"], small["labels"])["params"]

        if mode == "fwd":
            return init, lambda p, b, r: model.apply({"params": p}, b["input_ids"], b["attention_mask"])
        return init, lambda p, b, r: model.apply(
            {"params": p}, b["input_ids"], b["attention_mask"], b["labels"], deterministic=False, rngs={"dropout": r}
        )

    if mode == "fwd":
        model = lj.LongformerModel(cfg, add_pooling_layer=False)

        def apply(p, b, r):
            return model.apply(
                {"params": p},
                b["input_ids"],
                attention_mask=b["attention_mask"],
                global_attention_mask=b["global_attention_mask"],
                num_global_slots=G,
            ).last_hidden_state

    elif case.get("task") == "mlm":
        model = lj.LongformerForMaskedLM(cfg)

        def apply(p, b, r):
            return model.apply(
                {"params": p},
                b["input_ids"],
                attention_mask=b["attention_mask"],
                global_attention_mask=b["global_attention_mask"],
                labels=b["masked_labels"],
                masked_positions=b["masked_positions"],
                deterministic=False,
                num_global_slots=G,
                rngs={"dropout": r},
            ).loss

    else:
        model = lj.LongformerForTokenClassification(cfg)

        def apply(p, b, r):
            return model.apply(
                {"params": p},
                b["input_ids"],
                attention_mask=b["attention_mask"],
                global_attention_mask=b["global_attention_mask"],
                labels=b["labels"],
                deterministic=False,
                num_global_slots=G,
                rngs={"dropout": r},
            ).loss

    def init(rng, batch):
        w = cfg.max_window
        small = {k: v[:, :w] for k, v in batch.items()}
        return model.init(
            rng, small["input_ids"], global_attention_mask=jnp.zeros_like(small["input_ids"]), num_global_slots=0
        )["params"]

    return init, apply


def _memory_analysis(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}
    if m is None:
        return {}
    return {
        "temp": int(m.temp_size_in_bytes),
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }


def _reps(case: dict, mode: str) -> int:
    r = case["reps"]
    return int(r[mode]) if isinstance(r, dict) else int(r)


def _measure(case: dict, mode: str, arrays: dict, rss: common.PeakRSS) -> dict:
    """Compile, then time ``mode`` of the case; memory above the state before the timed calls."""
    import jax
    import optax

    init, apply = _functions(case, mode)
    params = jax.jit(init)(jax.random.PRNGKey(0), arrays)
    rng = jax.random.PRNGKey(1)
    if mode == "fwd":
        t0 = time.perf_counter()
        compiled = jax.jit(apply).lower(params, arrays, rng).compile()
        compile_s = time.perf_counter() - t0
        rss.reset()

        def run():
            compiled(params, arrays, rng).block_until_ready()

    else:
        tx = optax.adamw(common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY)

        def train_step(params, opt_state, batch, rng):
            loss, grads = jax.value_and_grad(apply)(params, batch, rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        t0 = time.perf_counter()
        compiled = (
            jax.jit(train_step, donate_argnums=(0, 1))
            .lower(params, jax.eval_shape(tx.init, params), arrays, rng)
            .compile()
        )
        compile_s = time.perf_counter() - t0
        rss.reset()  # the optimizer state is part of the measured memory, as on the PyTorch side
        state = {"params": params, "opt": tx.init(params)}
        del params

        def run():
            p, o, loss = compiled(state["params"], state["opt"], arrays, rng)
            loss.block_until_ready()
            state["params"], state["opt"] = p, o

    first = {}
    times = common.time_calls(
        run, _reps(case, mode), common.warmup_calls(case), after_first=lambda: first.update(b=rss.peak_bytes())
    )
    return {
        "times_s": times,
        "compile_s": compile_s,
        "peak_rss_bytes": first["b"],
        "peak_rss_all_calls_bytes": rss.peak_bytes(),
        "xla_memory": _memory_analysis(compiled),
    }


def run_case(case: dict) -> dict:
    _setup(case.get("device", "cpu"))
    import jax.numpy as jnp

    arrays = {k: jnp.asarray(v, jnp.int32) for k, v in common.case_inputs(case).items()}
    rss = common.PeakRSS()
    result = {"case": case, "modes": {}}
    for mode in case["modes"]:
        result["modes"][mode] = _measure(case, mode, arrays, rss)
        gc.collect()
    return result


def compile_only(case: dict) -> dict:
    """Compile time of the forward pass with abstract parameters (nothing is allocated or run)."""
    jax = _setup(case.get("device", "cpu"))
    import jax.numpy as jnp

    arrays = {k: jnp.asarray(v, jnp.int32) for k, v in common.case_inputs(case).items()}
    init, apply = _functions(case, "fwd")
    params = jax.eval_shape(init, jax.random.PRNGKey(0), arrays)
    t0 = time.perf_counter()
    lowered = jax.jit(apply).lower(params, arrays, jax.random.PRNGKey(1))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"kind": "compile", "case": case, "trace_lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def main(argv=None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    kind = spec.get("kind", "case")
    if kind == "matmul":
        common.emit(matmul_flops(spec.get("dtype", "float32"), spec.get("device", "cpu")))
    elif kind == "compile":
        common.emit(compile_only(spec["case"]))
    else:
        common.emit(run_case(spec["case"]))


if __name__ == "__main__":
    main()
