"""The pretraining program: `python -m train.pretrain --preset demo --output-dir runs/demo`.

`run` reads as setup -> restore_or_init -> loop -> export: it builds the tokenizer, the data
pipeline, model, driver and checkpointer (`setup`), restores the latest complete checkpoint in the output
directory or starts anew (`train.checkpoint.restore_or_init`), trains with periodic evaluation
and asynchronous Orbax checkpoints (`train.loop`), and exports the final weights
(`train.export`). A finished run leaves:

  DIR/config.json      the resolved configuration (and its fingerprint)
  DIR/model/           the model's HF config.json (what `python -m train.export` reads)
  DIR/tokenizer/       the tokenizer (trained on the corpus, or a copy of --tokenizer / --init's /
                       the prepared data's)
  DIR/data/            a raw-text --data, prepared (`train.prepare_data`; absent when --data is a
                       prepared directory)
  DIR/checkpoints/     Orbax steps (train state, data position, metadata)
  DIR/metrics.jsonl    train and eval records; DIR/tb/ the same for TensorBoard
  DIR/curves.png       training and evaluation curves
  DIR/hf/              the final weights as an HF directory (config.json, model.safetensors,
                       tokenizer files)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import longformer_jax as lj
from train import aot, data, export, prepare_data, trainer
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import metrics as metrics_lib
from train.loop import NonFiniteError, TrainLoop
from train.objectives import mlm_objective

# What --overwrite deletes: every file a run writes (config.json and model/ are rewritten).
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "tb",
    "hf",
    "curves.png",
    "batches.jsonl",
    data.RUN_TOKENIZER_DIR,
    data.RUN_DATA_DIR,
    export.MODEL_DIR,
)


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
        kwargs = dict(
            coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
        )
    jax.distributed.initialize(**kwargs)


def prepare_output_dir(cfg: config_lib.TrainConfig, out: Path) -> None:
    """With --overwrite, deletes a previous run's files; else refuses another run's checkpoints."""
    if not cfg.overwrite:
        ckpt_lib.check_resumable(cfg, out)
        return
    if _is_main():
        ckpt_lib.remove_run_files(out, [*RUN_FILES, *(p.name for p in out.glob("batches.*-of-*.jsonl"))])
    _sync("overwrite")


def load_tokenizer(cfg: config_lib.TrainConfig, out: Path):
    """The tokenizer: --tokenizer, else the one beside --init, else the prepared data's, else a BPE
    trained on the (raw, local) corpus.

    Whichever it is, DIR/tokenizer holds a copy, so the run directory is complete on its own.
    """
    saved = out / data.RUN_TOKENIZER_DIR
    prepared = data.looks_prepared(cfg.data)
    if prepared:
        data.open_prepared(cfg.data)  # an unfinished or damaged directory: its error, before anything else
    source = cfg.tokenizer or cfg.init or (str(Path(cfg.data) / data.TOKENIZER_DIR) if prepared else None)
    if source is None and cfg.data.startswith("hf:"):
        raise ValueError(
            f"--data {cfg.data} is streamed: pass --tokenizer (a tokenizer is trained only on a local "
            "corpus), or prepare the data first with python -m train.prepare_data"
        )
    if _is_main() and not data.has_tokenizer_files(saved):
        if source:
            data.load_tokenizer(source, model_max_length=cfg.seq_len).save_pretrained(str(saved))
        else:
            docs = list(data.read_documents(cfg.data))
            data.train_demo_tokenizer(docs, str(saved), vocab_size=cfg.tokenizer_vocab_size)
    _sync("tokenizer")
    return data.load_tokenizer(source or str(saved), model_max_length=cfg.seq_len)


def open_data(cfg: config_lib.TrainConfig, out: Path, tok) -> data.Manifest:
    """The prepared data of the run, checked against `tok` and the layout settings: --data itself when
    it is a prepared directory, else DIR/data, prepared from the raw-text --data (by the main process)."""
    if data.looks_prepared(cfg.data):
        directory = Path(cfg.data)
    else:
        directory = out / data.RUN_DATA_DIR
        if _is_main():
            settings = prepare_data.Settings(
                layout=cfg.layout,
                seq_len=cfg.seq_len,
                block_size=cfg.block_size,
                min_doc_tokens=cfg.min_doc_tokens,
                eval_docs=cfg.eval_docs,
            )
            prepare_data.prepare(cfg.data, tok, directory, settings, progress=cfg.progress_bar)
        _sync("data")
    return data.open_prepared(directory, tok, layout=cfg.layout, seq_len=cfg.seq_len, block_size=cfg.block_size)


def build_model(cfg: config_lib.TrainConfig, tok):
    """(model, params or None): --init's model and params, or a fresh model (params made on devices).

    `cfg.model_options()` applies to both. A fresh model's vocabulary and special token ids are
    the tokenizer's and its position table fits `seq_len`, unless `cfg.model` says otherwise.
    """
    if cfg.init:
        try:
            model, params = lj.load_pretrained(cfg.init, task="masked-lm", **cfg.model_options())
        except ValueError as e:
            given = f" (--model {', '.join(sorted(cfg.model))} applied over its config.json)" if cfg.model else ""
            raise ValueError(f"--init {cfg.init}{given}: {e}") from e
    else:
        ids = data.token_ids(tok)
        tokens = dict(
            vocab_size=len(tok),
            pad_token_id=ids.pad,
            bos_token_id=ids.bos,
            eos_token_id=ids.eos,
            sep_token_id=tok.sep_token_id if tok.sep_token_id is not None else ids.eos,
            max_position_embeddings=cfg.seq_len + ids.pad + 1,
        )
        model, params = lj.LongformerForMaskedLM(lj.LongformerConfig(**{**tokens, **cfg.model_options()})), None
    mc, name = model.config, cfg.init or "--model"
    if cfg.seq_len > mc.max_sequence_length:
        raise ValueError(
            f"seq_len={cfg.seq_len} is longer than {name!r} allows ({mc.max_sequence_length} tokens from its "
            f"max_position_embeddings={mc.max_position_embeddings}); lower --seq-len or extend the model's "
            "positions first (convert/)."
        )
    if cfg.seq_len % mc.max_window:
        raise ValueError(
            f"seq_len={cfg.seq_len} is not a multiple of the model's attention window "
            f"{mc.max_window}; pick --seq-len as a multiple of {mc.max_window}."
        )
    if len(tok) > mc.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens but the model ({name}) only vocab_size="
            f"{mc.vocab_size}; use the model's own tokenizer, or a larger model.vocab_size."
        )
    return model, params


@dataclasses.dataclass
class Setup:
    """Everything a run needs before its first step."""

    out: Path
    tok: Any
    model: Any
    driver: trainer.Driver
    ckpt: ckpt_lib.Checkpointer
    train_it: Any
    eval_batches: list[dict[str, np.ndarray]]
    make_params: Callable  # make_params(*param_inputs): the parameters of a new state
    param_inputs: tuple
    key: np.ndarray  # the run's dropout key
    num_examples: tuple[int, int]  # (train, eval)
    data_fingerprint: str  # the prepared data's manifest fingerprint


def setup(cfg: config_lib.TrainConfig) -> Setup:
    """Output directory, tokenizer, examples, model, driver and checkpointer of a run."""
    maybe_initialize_distributed(cfg)
    # Fail before any data work when the batch cannot be split over the devices or processes.
    trainer.check_batch_split(cfg, jax.device_count())
    pi, pc = jax.process_index(), jax.process_count()
    if cfg.batch_size % pc:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {pc} processes; use a multiple of {pc}.")
    out = Path(cfg.output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    prepare_output_dir(cfg, out)

    tok = load_tokenizer(cfg, out)
    prepared = open_data(cfg, out, tok)
    ckpt_lib.check_data(out, prepared.fingerprint, prepared.directory)
    batching = data.Batching(batch_size=cfg.batch_size // pc, seed=cfg.seed, shard_index=pi, shard_count=pc)
    spec = data.masking_spec(tok, cfg.mlm_probability)
    train_it = data.make_train_iterator(prepared, spec, batching)
    eval_batches = data.make_eval_batches(prepared, spec, batching, max_batches=cfg.eval_batches)

    model, init_params = build_model(cfg, tok)
    tx, schedule = trainer.make_optimizer(cfg)
    driver = trainer.make_driver(cfg, model, tx, mlm_objective(cfg.num_global_slots), schedule)
    ckpt = ckpt_lib.Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
    param_key, dropout_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    if init_params is None:
        make_params, param_inputs = (lambda key: lj.init_params(model, key)), (param_key,)
    else:
        make_params, param_inputs = (lambda params: params), (init_params,)
    return Setup(
        out,
        tok,
        model,
        driver,
        ckpt,
        train_it,
        eval_batches,
        make_params,
        param_inputs,
        np.asarray(jax.device_get(dropout_key)),
        (prepared.num_train, prepared.num_eval),
        prepared.fingerprint,
    )


def write_run_files(cfg: config_lib.TrainConfig, s: Setup) -> None:
    """DIR/config.json (settings and fingerprint) and DIR/model/config.json (the model's HF config)."""
    if not _is_main():
        return
    saved = {**cfg.to_dict(), "fingerprint": cfg.fingerprint(), ckpt_lib.DATA_FINGERPRINT: s.data_fingerprint}
    (s.out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    s.model.config.save_pretrained(s.out / export.MODEL_DIR, architectures=["LongformerForMaskedLM"])


def _announce(cfg: config_lib.TrainConfig, s: Setup, state, resumed_from: int | None) -> str:
    skip = 1 if s.driver.name == "pmap" else 0
    n_params = sum(int(np.prod(x.shape[skip:])) for x in jax.tree.leaves(state.params))
    return (
        f"{'resuming from step ' + str(resumed_from) if resumed_from is not None else 'starting'}: "
        f"{n_params / 1e6:.2f}M params, {s.num_examples[0]} train / {s.num_examples[1]} eval examples of "
        f"{cfg.seq_len} tokens, {s.driver.num_devices} device(s) ({s.driver.name}), batch "
        f"{cfg.batch_size} x {cfg.grad_accum_steps} accumulation, {cfg.max_steps} steps -> {s.out}"
    )


def batch_log_name() -> str:
    """`batches.jsonl`, or `batches.{i}-of-{n}.jsonl` for process i of n > 1: each logs its own rows."""
    pi, pc = jax.process_index(), jax.process_count()
    return "batches.jsonl" if pc == 1 else f"batches.{pi}-of-{pc}.jsonl"


# ----------------------------------------------------------------------------------------------
# The run


def run(cfg: config_lib.TrainConfig) -> dict[str, Any]:
    """Trains to cfg.max_steps (resuming if possible); returns a summary dict."""
    cfg.validate()
    t_start = time.time()
    s = setup(cfg)
    state, resumed_from = ckpt_lib.restore_or_init(
        s.ckpt, s.driver, s.make_params, *s.param_inputs, data_iterator=s.train_it
    )
    s.param_inputs = ()  # the initial parameters are in the state now
    write_run_files(cfg, s)

    main_proc = _is_main()
    logger = metrics_lib.MetricsLogger(s.out, enabled=main_proc)
    progress = metrics_lib.Progress(cfg.max_steps, initial=resumed_from or 0, enabled=main_proc and cfg.progress_bar)
    progress.write(_announce(cfg, s, state, resumed_from))
    batch_log = open(s.out / batch_log_name(), "a", buffering=1) if cfg.log_batch_fingerprints else None
    loop = TrainLoop(
        cfg,
        s.driver,
        s.ckpt,
        s.train_it,
        s.eval_batches,
        key=s.key,
        logger=logger,
        progress=progress,
        batch_log=batch_log,
    )
    try:
        r = loop.run(state, resumed_from or 0)
    finally:
        progress.close()
        if batch_log is not None:
            batch_log.close()
        s.ckpt.close()

    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    summary: dict[str, Any] = {
        "status": r.status,
        "step": r.step,
        "output_dir": str(s.out),
        "resumed_from": resumed_from,
        "first_eval": r.first_eval,
        "final_eval": r.final_eval,
        "train_seconds": r.train_seconds,
        "steps_run": r.steps_timed,
        "tokens_per_s": r.steps_timed * tokens_per_step / r.train_seconds if r.steps_timed else None,
    }
    if r.status == "finished":
        summary.update(export_final(cfg, s, r.state, logger, summary, t_start))
    logger.close()
    return summary


def export_final(
    cfg: config_lib.TrainConfig, s: Setup, state, logger, summary: dict[str, Any], t_start: float
) -> dict[str, Any]:
    """DIR/hf (`train.export.write_model`), the summary record and the plot of a finished run."""
    params = s.driver.host_params(state)  # on every process (a collective with several)
    hf_dir = s.out / "hf"
    extra: dict[str, Any] = {"hf_dir": str(hf_dir), "final_params": params}
    if _is_main():
        export.write_model(hf_dir, s.model.config, params, s.tok, task="masked-lm", overwrite=True)
        logger.write(
            "summary",
            summary["step"],
            {"wall_seconds": time.time() - t_start, "tokens_per_s": summary["tokens_per_s"] or float("nan")},
        )
        extra["plot"] = str(metrics_lib.plot_run(s.out))
    return extra


def fill_mask_demo(hf_dir: str, text: str, tok) -> None:
    """Runs fill-mask with the exported model (longformer_jax.pipeline.fill_mask)."""
    text = text.replace("<mask>", tok.mask_token)
    print(f"fill-mask: {text}")
    for r in lj.fill_mask(hf_dir, text, top_k=5):
        print(f"  {r['token_str']!r:>20}  {r['score']:.4f}")


def main(argv: list[str] | None = None) -> int:
    request = None
    try:
        request, argv = aot.split_args(argv)
        cfg = config_lib.parse_args(argv)
        if request is not None:  # --target NAME --compile-only: sized for the target, nothing trained
            return aot.main(request, aot.pretrain_plan(cfg))
        summary = run(cfg)
    except (ValueError, FileNotFoundError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteError) else 1
    except RuntimeError as e:  # compiling for a target: its compiler is missing, or refused the program
        if request is None:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if summary["status"] != "finished" or jax.process_index() != 0:
        return 0
    out = Path(summary["output_dir"])
    fe, le = summary.get("first_eval") or {}, summary.get("final_eval") or {}
    if le:
        print(metrics_lib.eval_summary(fe, le))
    if summary.get("tokens_per_s"):
        print(
            f"{summary['steps_run']} steps in {summary['train_seconds']:.0f}s ({summary['tokens_per_s']:,.0f} tokens/s)"
        )
    if cfg.fill_mask_text:
        fill_mask_demo(summary["hf_dir"], cfg.fill_mask_text, data.load_tokenizer(summary["hf_dir"]))
    print(f"run directory: {out}")
    print(f"  config:      {out / 'config.json'}")
    print(f"  checkpoints: {out / 'checkpoints'} (export any step: python -m train.export {out} DST --step N)")
    print(f"  metrics:     {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out / 'tb'})")
    print(f"  plot:        {summary.get('plot')} (redraw: python -m train.metrics {out})")
    print(f"  HF model:    {summary['hf_dir']}")
    return 0


if __name__ == "__main__":
    from longformer_jax import targets
    from longformer_jax.compile_options import use_training_xla_flags

    if "--target" in sys.argv:
        aot.use_cpu_host()  # compiles for another machine: JAX runs on this host's CPU
    use_training_xla_flags()
    targets.start_jax()  # the host's CPU unless it has a GPU or TPU (the aot extra's plugins stay quiet)
    sys.exit(main())
