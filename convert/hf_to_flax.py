"""Hugging Face (PyTorch) Longformer -> Flax checkpoint directory.

    python -m convert.hf_to_flax SRC DST [--task T] [--verify]

SRC: a local HF directory (config.json + model.safetensors or pytorch_model.bin) or a hub id.
DST: a new directory with config.json, the tokenizer files, flax_params/ (Orbax) and
longformer_jax.json; `longformer_jax.load_pretrained(DST)` and the pretraining program read it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from convert._cli import run_command
from convert.verify import verify_against_pytorch
from longformer_jax.pretrained import (
    ConversionError,
    check_destination,
    load_hf_checkpoint,
    resolve_source,
    save_flax_checkpoint,
    tokenizer_note,
)
from longformer_jax.tasks import TASKS


def hf_to_flax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    task: str | None = None,
    *,
    verify: bool = False,
    tolerance: float | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """HF directory or hub id -> Flax checkpoint directory. Returns a summary dict.

    ``verify``: compare against the PyTorch model first (``summary["max_abs_diff"]``); with ``tolerance``,
    a larger difference raises and nothing is written. A head missing from the checkpoint is an error.
    """
    check_destination(dst, overwrite=overwrite)
    src_dir = resolve_source(src)
    config, task, params = load_hf_checkpoint(src_dir, task)
    summary: dict[str, Any] = {"task": task, "src": str(src_dir), "dst": str(dst)}
    if verify:
        diff = verify_against_pytorch(src_dir, config, params, task, log=log)
        summary["max_abs_diff"] = diff
        if tolerance is not None and not diff <= tolerance:
            raise ConversionError(
                f"verification failed: max abs diff {diff:.3e} between PyTorch and Flax exceeds {tolerance:g}; "
                f"nothing written to {dst}."
            )
    copied = save_flax_checkpoint(dst, config, params, task, tokenizer=src_dir, overwrite=overwrite)
    summary["tokenizer_files"] = copied
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    log(f"wrote Flax checkpoint {dst} (task {task}, {n:,} parameters)")
    log(tokenizer_note(src_dir, copied))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.hf_to_flax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", help="HF checkpoint directory or hub id (e.g. kiddothe2b/longformer-base-4096)")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument(
        "--task",
        choices=list(TASKS),
        default=None,
        help="model head; default: from config.json's `architectures` / the weight names",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the PyTorch and the Flax model on one random input (padding, a few global "
        "tokens) and print the max abs difference",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="with --verify: fail (exit 1, nothing written) above this max abs diff",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        summary = hf_to_flax(
            args.src,
            args.dst,
            args.task,
            verify=args.verify,
            overwrite=args.overwrite,
            tolerance=args.tolerance if args.verify else None,
        )
        if args.verify:
            print(f"max abs diff PyTorch vs Flax: {summary['max_abs_diff']:.3e}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
