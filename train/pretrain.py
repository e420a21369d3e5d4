"""The pretraining program: `python -m train.pretrain --preset demo --output-dir runs/demo`.

Reads the config (preset + flags), builds the tokenizer, examples and model, then runs the
optimizer steps with periodic evaluation and asynchronous Orbax checkpoints, resuming from the
latest complete checkpoint in the output directory. A finished run leaves:

  DIR/config.json      the resolved configuration (and its fingerprint)
  DIR/checkpoints/     Orbax steps (train state, data-iterator state, metadata)
  DIR/metrics.jsonl    train and eval records; DIR/tb/ the same for TensorBoard
  DIR/curves.png       training and evaluation curves
  DIR/hf/              the final weights as an HF directory (config.json, model.safetensors,
                       tokenizer files)
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import metrics as metrics_lib
from train import trainer

BATCH_KEYS = ("input_ids", "attention_mask", "global_attention_mask", "labels")


class NonFiniteError(RuntimeError):
    """A step produced a loss or gradient norm that is NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# Setup helpers


def _is_main() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed(cfg: config_lib.TrainConfig) -> None:
    if not (cfg.distributed or cfg.coordinator_address):
        return
    kwargs = {}
    if cfg.coordinator_address:
        kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                      process_id=cfg.process_id)
    jax.distributed.initialize(**kwargs)


def check_output_dir(cfg: config_lib.TrainConfig, out: Path) -> None:
    """Refuses an output dir holding another run's checkpoints unless --overwrite is given."""
    ckpt_dir = out / "checkpoints"
    has_ckpts = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    saved_cfg = out / "config.json"
    if cfg.overwrite:
        if _is_main():
            for name in ("checkpoints", "metrics.jsonl", "tb", "hf", "curves.png", "batches.jsonl",
                         "tokenizer"):
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        _sync("overwrite")
        return
    if not has_ckpts:
        return
    if not saved_cfg.exists():
        raise ValueError(
            f"--output-dir {out} holds checkpoints ({ckpt_dir}) but no config.json, so they cannot be "
            "matched to this run: pick another --output-dir, or pass --overwrite to delete them and "
            "start over.")
    old = config_lib.TrainConfig.load(saved_cfg).fingerprint_fields()
    new = cfg.fingerprint_fields()
    diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
    if diff:
        shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"--output-dir {out} holds checkpoints of a different run ({shown}). Pick another "
            "--output-dir, rerun with the saved settings to resume, or pass --overwrite to delete "
            "those checkpoints and start over.")


def load_tokenizer(cfg: config_lib.TrainConfig, out: Path, data):
    """The tokenizer: --tokenizer, else the one beside --init, else a BPE trained on the corpus."""
    if cfg.tokenizer:
        tok = data.load_tokenizer(cfg.tokenizer, model_max_length=cfg.seq_len)
    elif cfg.init:
        tok = data.load_tokenizer(cfg.init, model_max_length=cfg.seq_len)
    else:
        tok_dir = out / "tokenizer"
        if _is_main() and not (tok_dir / "tokenizer.json").exists():
            docs = data.read_documents(cfg.data)
            if cfg.max_docs is not None:
                docs = (d for i, d in zip(range(cfg.max_docs), docs, strict=False))
            data.train_demo_tokenizer(list(docs), str(tok_dir), vocab_size=cfg.tokenizer_vocab_size)
        _sync("tokenizer")
        tok = data.load_tokenizer(str(tok_dir), model_max_length=cfg.seq_len)
    if getattr(tok, "mask_token_id", None) is None:
        name = cfg.tokenizer or cfg.init or "the trained tokenizer"
        raise ValueError(
            f"tokenizer {name!r} has no mask token, which masked-LM pretraining needs; use a tokenizer "
            "with a <mask> token (e.g. --tokenizer roberta-base) or add one before training.")
    return tok


def build_model(cfg: config_lib.TrainConfig, tok):
    """(model, params or None): from --init, or a fresh config (params then made on devices)."""
    import longformer_jax as lj

    dropout_kw = {}
    if not cfg.dropout:
        dropout_kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if cfg.init:
        model, params = lj.load_pretrained(cfg.init, task="masked-lm", dtype=cfg.dtype, remat=cfg.remat,
                                           scan_layers=cfg.scan_layers, **dropout_kw)
        mc = model.config
        if cfg.seq_len > mc.max_position_embeddings - mc.pad_token_id - 1:
            raise ValueError(
                f"seq_len={cfg.seq_len} is longer than {cfg.init!r} allows "
                f"({mc.max_position_embeddings - mc.pad_token_id - 1} tokens from its "
                f"max_position_embeddings={mc.max_position_embeddings}); lower --seq-len or extend the "
                "model's positions first (convert/).")
        if cfg.seq_len % mc.max_window:
            raise ValueError(f"seq_len={cfg.seq_len} is not a multiple of the model's attention window "
                             f"{mc.max_window}; pick --seq-len as a multiple of {mc.max_window}.")
        if len(tok) > mc.vocab_size:
            raise ValueError(f"the tokenizer has {len(tok)} tokens but {cfg.init!r} only "
                             f"vocab_size={mc.vocab_size}; use the model's own tokenizer.")
        return model, params
    vocab = cfg.vocab_size or len(tok)
    if vocab < len(tok):
        raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer's {len(tok)} tokens; "
                         "leave --vocab-size unset to use the tokenizer's size.")
    mc = lj.LongformerConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        attention_window=cfg.attention_window,
        max_position_embeddings=cfg.max_position_embeddings or cfg.seq_len + tok.pad_token_id + 1,
        hidden_dropout_prob=cfg.hidden_dropout_prob if cfg.dropout else 0.0,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob if cfg.dropout else 0.0,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 0,
        eos_token_id=tok.eos_token_id if tok.eos_token_id is not None else 2,
        sep_token_id=tok.sep_token_id if tok.sep_token_id is not None else 2,
        dtype=cfg.dtype,
        remat=cfg.remat,
        scan_layers=cfg.scan_layers,
    )
    return lj.LongformerForMaskedLM(mc), None


def batch_fingerprint(batch: dict[str, Any]) -> str:
    h = hashlib.sha1()
    for k in ("input_ids", "labels"):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]


def _json_safe(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# The run


def run(cfg: config_lib.TrainConfig) -> dict[str, Any]:
    """Trains to cfg.max_steps (resuming if possible); returns a summary dict."""
    cfg.validate()
    t_start = time.time()
    maybe_initialize_distributed(cfg)
    from longformer_jax import sharding as shd
    from train import data

    # Fail before any data work when the batch cannot be split over the devices.
    shd.check_batch_divisible(cfg.batch_size, jax.device_count(), "batch_size")

    out = Path(cfg.output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    check_output_dir(cfg, out)
    main_proc = _is_main()
    pi, pc = jax.process_index(), jax.process_count()

    # --- tokenizer, examples ---
    tok = load_tokenizer(cfg, out, data)
    # Examples are cached under DIR/cache (keyed by corpus, tokenizer and layout), so a resumed
    # run does not tokenize again; with several processes each builds its own copy in memory.
    examples = data.load_or_build_examples(
        cfg.data, tok, str(out / "cache") if pc == 1 else None, layout=cfg.layout, seq_len=cfg.seq_len,
        block_size=cfg.block_size, min_doc_words=cfg.min_doc_words, max_docs=cfg.max_docs)
    eval_split = int(cfg.eval_fraction) if cfg.eval_fraction >= 1 else cfg.eval_fraction
    train_ex, eval_ex = data.split_examples(examples, eval_split, cfg.seed)

    # --- model, optimizer, driver ---
    model, init_params = build_model(cfg, tok)
    tx, schedule = trainer.make_optimizer(cfg)
    driver = trainer.make_driver(cfg, model, tx, schedule)
    if cfg.batch_size % pc:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {pc} processes; "
                         f"use a multiple of {pc}.")
    host_batch = cfg.batch_size // pc

    train_it = data.make_train_iterator(train_ex, tok, batch_size=host_batch, seed=cfg.seed,
                                        mlm_probability=cfg.mlm_probability, shard_index=pi,
                                        shard_count=pc)
    eval_batches = data.make_eval_batches(eval_ex, tok, batch_size=host_batch, seed=cfg.seed,
                                          mlm_probability=cfg.mlm_probability, shard_index=pi,
                                          shard_count=pc, pad_last=True)
    eval_batches = [{k: b[k] for k in BATCH_KEYS} for b in eval_batches]
    if cfg.eval_batches is not None:
        eval_batches = eval_batches[: cfg.eval_batches]

    # --- state: resume or start ---
    import longformer_jax as lj

    base_rng = jax.random.PRNGKey(cfg.seed)
    param_rng, train_rng = jax.random.split(base_rng)
    ckpt = ckpt_lib.Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpointing)
    latest = ckpt.latest_step()
    if latest is not None:
        p_shapes = jax.eval_shape(lambda k: lj.init_params(model, k), param_rng) if init_params is None \
            else jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), init_params)
        abstract = driver.abstract_state(p_shapes, train_rng)
        state, data_state, meta = ckpt.restore(latest, abstract)
        state = driver.restored(state)
        if data_state is not None:
            train_it.set_state(data_state)
        resumed_from = latest
    else:
        if init_params is None:
            state = driver.init_state(lambda k: lj.init_params(model, k), param_rng, train_rng)
        else:
            state = driver.create_state(init_params, train_rng)
        del init_params
        resumed_from = None

    if main_proc:
        saved = cfg.to_dict()
        saved["fingerprint"] = cfg.fingerprint()
        (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        # The model's own config.json, so that `convert.flax_to_hf RUN_DIR` exports any checkpoint exactly.
        model.config.save_pretrained(out / "model", architectures=["LongformerForMaskedLM"])
    host_rng = np.asarray(jax.device_get(train_rng))

    # --- watching ---
    logger = metrics_lib.MetricsLogger(out, enabled=main_proc)
    start_step = resumed_from or 0
    progress = metrics_lib.Progress(cfg.max_steps, initial=start_step, enabled=main_proc and cfg.progress_bar)
    skip = 1 if driver.name == "pmap" else 0
    n_params = sum(int(np.prod(x.shape[skip:])) for x in jax.tree.leaves(state.params))
    progress.write(
        f"{'resuming from step ' + str(resumed_from) if resumed_from is not None else 'starting'}: "
        f"{n_params / 1e6:.2f}M params, {len(train_ex['input_ids'])} train / "
        f"{len(eval_ex['input_ids'])} eval examples of "
        f"{cfg.seq_len} tokens, {driver.num_devices} device(s) ({driver.name}), batch "
        f"{cfg.batch_size} x {cfg.grad_accum_steps} accumulation, {cfg.max_steps} steps -> {out}")
    fp_file = open(out / "batches.jsonl", "a", buffering=1) if cfg.log_batch_fingerprints and main_proc \
        else None

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None

    def evaluate(step: int) -> dict[str, float]:
        sums = []
        for b in eval_batches:
            sums.append(jax.device_get(driver.evaluate(state, b)))
        res = trainer.finish_eval(sums) if sums else {}
        if res:
            logger.write("eval", step, res)
            progress.write(f"step {step}: eval loss {res['loss']:.4f}  accuracy {res['accuracy']:.4f}  "
                           f"bpc {res['bpc']:.4f}")
        return res

    def save(step: int) -> None:
        meta = {"step": step, "fingerprint": cfg.fingerprint(),
                "examples_seen": step * cfg.global_batch_size}
        ckpt.save(step, driver.for_save(state), train_it.get_state(), meta)

    first_eval = None
    last_eval: dict[str, float] = {}
    if start_step == 0 and eval_batches:
        first_eval = last_eval = evaluate(0)
    step = start_step
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    interval = {"loss": 0.0, "acc": 0.0, "n": 0, "steps": 0}
    status = "finished"
    t_loop = time.perf_counter()
    steps_timed = 0
    try:
        while step < cfg.max_steps:
            micro = []
            for a in range(cfg.grad_accum_steps):
                try:
                    b = next(train_it)
                except StopIteration:
                    raise ValueError(
                        f"the training data ran out at step {step}; the train iterator must repeat "
                        "(epochs) - check --data and --max-docs.") from None
                if fp_file is not None:
                    fp_file.write(json.dumps({"step": step, "micro": a, "hash": batch_fingerprint(b)}) + "\n")
                micro.append({k: b[k] for k in BATCH_KEYS})
            host = trainer.stack_micro_batches(micro)
            rng = jax.random.fold_in(host_rng, step)
            state, m = driver.train(state, host, rng)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                ckpt.wait()
                good = ckpt.latest_step()
                raise NonFiniteError(
                    f"step {step + 1}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; the run "
                    f"stopped without saving this state. The last good checkpoint is "
                    f"{'step ' + str(good) if good is not None else 'none'} in {out / 'checkpoints'}. "
                    "Lower --learning-rate, check the data, or train in --dtype float32.")
            step += 1
            if step == start_step + 1:  # leave the first step (compilation) out of the timing
                jax.block_until_ready(state.step)
                t_loop = time.perf_counter()
            else:
                steps_timed += 1
            interval["loss"] += m["loss"]
            interval["acc"] += m["accuracy"]
            interval["steps"] += 1
            tps = progress.update(1, tokens_per_step, loss=m["loss"], lr=m.get("lr", 0.0))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                k = interval["steps"]
                rec = {"loss": interval["loss"] / k, "accuracy": interval["acc"] / k,
                       "grad_norm": m["grad_norm"], "lr": m.get("lr", float("nan")),
                       "tokens_per_s": tps, "examples_seen": step * cfg.global_batch_size}
                logger.write("train", step, rec)
                interval = {"loss": 0.0, "acc": 0.0, "n": 0, "steps": 0}
            if step % cfg.eval_every == 0 and step != cfg.max_steps and eval_batches:
                last_eval = evaluate(step)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save(step)
            if stop["signal"] is not None:
                save(step)
                ckpt.wait()
                status = "preempted"
                progress.write(f"SIGTERM: saved step {step} to {out / 'checkpoints'}; rerun the same "
                               "command to resume.")
                break
        train_seconds = time.perf_counter() - t_loop
        if status == "finished" and eval_batches:
            last_eval = evaluate(step)
        ckpt.wait()
    finally:
        progress.close()
        if fp_file is not None:
            fp_file.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        ckpt.close()

    summary: dict[str, Any] = {
        "status": status, "step": step, "output_dir": str(out), "resumed_from": resumed_from,
        "first_eval": first_eval, "final_eval": last_eval, "train_seconds": train_seconds,
        "steps_run": steps_timed,
        "tokens_per_s": steps_timed * tokens_per_step / train_seconds if steps_timed else None,
    }
    if status != "finished":
        logger.close()
        return summary

    # --- export, plot, fill-mask ---
    params = driver.host_params(state)
    hf_dir = out / "hf"
    if main_proc:
        lj.save_pretrained(hf_dir, model, params, tokenizer=tok)
        logger.write("summary", step, {"wall_seconds": time.time() - t_start,
                                       "tokens_per_s": summary["tokens_per_s"] or float("nan")})
        logger.close()
        summary["plot"] = str(metrics_lib.plot_run(out))
    else:
        logger.close()
    summary["hf_dir"] = str(hf_dir)
    summary["final_params"] = params
    return summary


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def fill_mask_demo(hf_dir: str, text: str, tok) -> None:
    """Runs fill-mask with the exported model (longformer_jax.pipeline.fill_mask)."""
    try:
        from longformer_jax.pipeline import fill_mask
    except ImportError:
        print("fill-mask skipped: longformer_jax.pipeline.fill_mask is not available in this build.")
        return
    text = text.replace("<mask>", tok.mask_token)
    print(f"fill-mask: {text}")
    for r in fill_mask(hf_dir, text, top_k=5):
        token = r.get("token_str", r.get("token")) if isinstance(r, dict) else r
        score = r.get("score") if isinstance(r, dict) else None
        print(f"  {token!r:>20}  {score:.4f}" if score is not None else f"  {token!r}")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_lib.parse_args(argv)
        summary = run(cfg)
    except (ValueError, FileNotFoundError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteError) else 2
    if summary["status"] != "finished" or jax.process_index() != 0:
        return 0
    out = Path(summary["output_dir"])
    fe, le = summary.get("first_eval") or {}, summary.get("final_eval") or {}
    if fe and le:
        print(f"eval loss {fe['loss']:.4f} -> {le['loss']:.4f} (bpc {fe['bpc']:.3f} -> {le['bpc']:.3f}, "
              f"accuracy {fe['accuracy']:.3f} -> {le['accuracy']:.3f})")
    elif le:
        print(f"eval loss {le['loss']:.4f} (bpc {le['bpc']:.3f}, accuracy {le['accuracy']:.3f})")
    if summary.get("tokens_per_s"):
        print(f"{summary['steps_run']} steps in {summary['train_seconds']:.0f}s "
              f"({summary['tokens_per_s']:,.0f} tokens/s)")
    if cfg.fill_mask_text:
        from train import data

        fill_mask_demo(summary["hf_dir"], cfg.fill_mask_text, data.load_tokenizer(summary["hf_dir"]))
    print(f"run directory: {out}")
    print(f"  config:      {out / 'config.json'}")
    print(f"  checkpoints: {out / 'checkpoints'}")
    print(f"  metrics:     {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out / 'tb'})")
    print(f"  plot:        {summary.get('plot')} (redraw: python -m train.metrics {out})")
    print(f"  HF model:    {summary['hf_dir']}")
    return 0


if __name__ == "__main__":
    from longformer_jax.compile_options import use_training_xla_flags

    use_training_xla_flags()  # before the first JAX computation (XLA reads XLA_FLAGS once)
    sys.exit(main())
