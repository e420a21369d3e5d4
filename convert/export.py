"""A model -> serving artifacts: jax.export (StableHLO) programs per length bucket, optionally ONNX, a manifest.

    python -m convert.export SRC DST [--lengths 512,1024,4096] [--num-global-slots G] [--platforms cpu,cuda,tpu]
                                     [--embed-weights] [--onnx] [--verify] [--overwrite]

SRC: an HF directory or hub id, a Flax checkpoint, a fine-tuning run (its best/ is exported, with the layout it
was fine-tuned with) or a pretraining run (its latest checkpoint). DST: a new directory that
``longformer_jax.load_exported(DST)`` runs with jax and numpy alone (docs/serving.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from convert._cli import run_command
from longformer_jax.export import DEFAULT_LENGTHS, DEFAULT_PLATFORMS, export_model
from longformer_jax.pretrained import check_destination, load_checkpoint
from longformer_jax.tasks import TASKS, build_model
from train import data as data_lib
from train import export as run_export


def load_source(src: str, task: str | None = None) -> tuple[Any, str, Any, Any]:
    """(config, task, params, tokenizer source) of SRC: a fine-tuning run's best/, a pretraining run's latest
    checkpoint, or any checkpoint ``load_checkpoint`` reads."""
    path = Path(src).expanduser()
    if (path / "best").is_dir():
        path = path / "best"
    elif (path / "checkpoints").is_dir() and (path / run_export.MODEL_DIR).is_dir():
        config, run_task, params, _ = run_export.restore_run_params(path)
        tok = path / data_lib.RUN_TOKENIZER_DIR
        return config, task or run_task, params, tok if tok.is_dir() else None
    config, task, params, directory = load_checkpoint(path if path.exists() else src, task)
    return config, task, params, directory


def export(args: argparse.Namespace) -> dict[str, Any]:
    check_destination(args.dst, overwrite=args.overwrite)
    config, task, params, tokenizer = load_source(args.src, args.task)
    model = build_model(config, task)
    labels = None
    if task in ("sequence-classification", "token-classification") or "sentence" in task or "document" in task:
        names = config.id2label or {}
        labels = [names.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    return export_model(
        model,
        params,
        args.dst,
        lengths=args.lengths,
        num_global_slots=args.num_global_slots,
        platforms=args.platforms,
        embed_weights=args.embed_weights,
        onnx=args.onnx,
        tokenizer=tokenizer,
        labels=labels,
        finetuning=config.extra.get("finetuning"),
        verify=args.verify,
        overwrite=args.overwrite,
    )


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of lengths, e.g. 512,1024") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", help="HF directory or hub id, Flax checkpoint, fine-tuning run or pretraining run")
    p.add_argument("dst", help="output directory (must not exist, or --overwrite)")
    p.add_argument("--task", choices=list(TASKS), default=None, help="the head to export; default: the source's own")
    p.add_argument(
        "--lengths",
        type=_int_list,
        default=None,
        help=f"length buckets, multiples of the largest attention window (default: those of "
        f"{','.join(map(str, DEFAULT_LENGTHS))} the position embeddings hold)",
    )
    p.add_argument(
        "--num-global-slots",
        type=int,
        default=None,
        help="the most global tokens a row may hold (default: 1 for <s>, the block starts of the largest bucket for "
        "the sentence-block layout, 64 for a question or the choices, else 0)",
    )
    p.add_argument(
        "--platforms",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help=f"platforms to lower for (default {','.join(DEFAULT_PLATFORMS)}; a kernel's own platform with a kernel)",
    )
    p.add_argument("--embed-weights", action="store_true", help="bake the weights into the programs")
    p.add_argument("--onnx", action="store_true", help="also write ONNX files (jax2onnx; the onnx extra)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="run every artifact on this host against the Flax model (StableHLO <= 1e-5, ONNX <= 1e-4); on a "
        "mismatch nothing is written",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_global_slots is not None and args.num_global_slots < 0:
        print(f"error: --num-global-slots {args.num_global_slots} must be 0 or more.", file=sys.stderr)
        return 1
    return run_command(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
