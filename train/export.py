"""Export of a training run: one checkpoint step's parameters -> an HF directory or a Flax checkpoint.

    python -m train.export RUN_DIR DST [--step N] [--format hf|flax] [--overwrite]

The one place that reads a run directory as the training programs leave it:

  RUN_DIR/config.json        the run's settings (`TrainConfig`)
  RUN_DIR/model/config.json  the model's HF config (with its `architectures`, hence the head)
  RUN_DIR/checkpoints/<N>/   train states, restored with the trainer's own checkpoint code into
                             the structure the trainer builds (no searching)
  RUN_DIR/tokenizer/         the tokenizer the run used (else the one its settings name)

``--format hf`` (default) writes config.json, model.safetensors and the tokenizer files, which
``transformers`` and ``longformer_jax.load_pretrained`` read; ``--format flax`` writes this
project's Flax checkpoint. The output is built in a temporary directory and renamed into place
only when complete. The end-of-run ``hf/`` directory of ``train.pretrain`` is written by
`write_model` too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

import longformer_jax as lj
from longformer_jax.pretrained import ConversionError, check_destination, save_flax_checkpoint, save_hf_checkpoint
from longformer_jax.state_dict import convert_params
from longformer_jax.tasks import TASKS, task_of_architecture
from train import checkpoint as ckpt_lib
from train import data, trainer
from train.config import TrainConfig

FORMATS = ("hf", "flax")
MODEL_DIR = "model"  # RUN_DIR/model/config.json: the model's HF config, written when a run starts


def write_model(
    dst: str | Path,
    config: lj.LongformerConfig,
    params: Any,
    tokenizer: Any,
    *,
    task: str = "masked-lm",
    output_format: str = "hf",
    overwrite: bool = False,
) -> None:
    """Writes `params` of the `task` model with `config` to `dst`, atomically.

    ``output_format="hf"``: config.json, model.safetensors and the tokenizer's files;
    ``"flax"``: a Flax checkpoint with one parameter tree per layer, whatever `config.scan_layers`
    (``longformer_jax.load_pretrained`` reads both, and stacks the layers again on request).
    """
    params = jax.device_get(params)
    if output_format == "hf":
        save_hf_checkpoint(dst, config, params, task, tokenizer, overwrite=overwrite)
        return
    if config.scan_layers:
        config, params = convert_params(params, config, task, scan_layers=False, allow_new_head=False)
    save_flax_checkpoint(dst, config, params, task, tokenizer, overwrite=overwrite)


def _check_run_dir(run: Path) -> None:
    if not run.is_dir():
        raise ConversionError(f"run directory {run} does not exist; pass the --output-dir of a training run.")
    for path, what in (
        (run / "config.json", "the run's settings"),
        (run / MODEL_DIR / "config.json", "the model's config"),
        (run / "checkpoints", "the checkpoints"),
    ):
        if not path.exists():
            raise ConversionError(
                f"{run} is not a training run directory: {path} ({what}) is missing. Pass the --output-dir "
                "of a run of python -m train.pretrain (runs from older versions: rerun them)."
            )


def _run_tokenizer(run: Path, cfg: TrainConfig) -> Any:
    saved = run / data.RUN_TOKENIZER_DIR
    source = str(saved) if data.has_tokenizer_files(saved) else (cfg.tokenizer or cfg.init)
    if source is None:
        raise ConversionError(
            f"{run}: no tokenizer ({saved} is missing and the run names none); copy the "
            f"run's tokenizer files into {saved}."
        )
    return data.load_tokenizer(source, model_max_length=cfg.seq_len)


def _read_task(model_dir: Path) -> str:
    """The task of the model whose config.json `architectures` names it."""
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    task = task_of_architecture(architectures[0]) if architectures else None
    if task is None:
        raise ConversionError(
            f"{model_dir / 'config.json'}: architectures={architectures} names no model of "
            f"this library; expected one of {sorted(t.hf_architecture for t in TASKS.values())}."
        )
    return task


def restore_run_params(run_dir: str | Path, step: int | None = None) -> tuple[lj.LongformerConfig, str, Any, int]:
    """(model config, task, params, step) of checkpoint `step` (default: the latest) of a run.

    The state is restored as the trainer resumes it (`Driver.abstract_state` of the run's model
    and optimizer), on one device, and the parameters are returned as numpy arrays.
    """
    run = Path(run_dir).expanduser().absolute()
    _check_run_dir(run)
    cfg = TrainConfig.load(run / "config.json")
    model_dir = run / MODEL_DIR
    config = lj.LongformerConfig.from_pretrained(model_dir, scan_layers=cfg.scan_layers)
    task = _read_task(model_dir)
    ckpt = ckpt_lib.Checkpointer(run / "checkpoints", read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConversionError(
                f"{run / 'checkpoints'} holds no complete checkpoint; train for at least --save-every steps first."
            )
        step = max(steps) if step is None else step
        if step not in steps:
            raise ConversionError(
                f"{run / 'checkpoints'} has no step {step}; the steps there are "
                f"{', '.join(map(str, sorted(steps)))} (--step)."
            )
        tx, _ = trainer.make_optimizer(cfg)
        model = lj.build_model(config, task)
        driver = trainer.MeshDriver(model, tx, None, dropout=False, devices=jax.devices()[:1])
        abstract = driver.abstract_state(lambda key: lj.init_params(model, key), jax.random.PRNGKey(0))
        try:
            state = ckpt.restore_state(step, abstract)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ConversionError(
                f"{run / 'checkpoints' / str(step)} does not hold this version's train state "
                f"(step, params, opt_state) of the model in {model_dir}: {e}"
            ) from e
        return config, task, driver.host_params(state), step
    finally:
        ckpt.close()


def export_run(
    run_dir: str | Path,
    dst: str | Path,
    *,
    step: int | None = None,
    output_format: str = "hf",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Writes checkpoint `step` (default: the latest) of the run in `run_dir` to `dst`.

    Returns ``{"dst", "step", "task", "format"}``. Bad input (no run there, no such step, an
    existing `dst` without `overwrite`, an unknown format) is a ``ValueError`` naming the fix,
    raised before anything is written.
    """
    if output_format not in FORMATS:
        raise ConversionError(f"format {output_format!r} is unknown; expected one of {', '.join(FORMATS)} (--format).")
    dst = check_destination(Path(dst).expanduser(), overwrite=overwrite)
    run = Path(run_dir).expanduser().absolute()
    _check_run_dir(run)
    tokenizer = _run_tokenizer(run, TrainConfig.load(run / "config.json"))
    config, task, params, step = restore_run_params(run, step)
    write_model(dst, config, params, tokenizer, task=task, output_format=output_format, overwrite=overwrite)
    log(
        f"wrote {dst}: step {step} of {run} as {'an HF directory' if output_format == 'hf' else 'a Flax checkpoint'}"
        f" ({task})"
    )
    return {"dst": str(dst), "step": step, "task": task, "format": output_format}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 1, as every bad input here
        self.exit(1, f"error: {message} (see python -m train.export --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", help="the --output-dir of a training run")
    p.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest)")
    p.add_argument(
        "--format",
        dest="output_format",
        default="hf",
        metavar="{hf,flax}",
        help="hf: config.json + model.safetensors + tokenizer (default); flax: a Flax checkpoint",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (1, its error line already printed)
        return int(e.code or 0)
    try:
        export_run(args.run_dir, args.dst, step=args.step, output_format=args.output_format, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # ConversionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
