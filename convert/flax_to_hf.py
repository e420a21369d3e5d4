"""Any params this project produces -> Hugging Face directory (config.json, model.safetensors, tokenizer).

    python -m convert.flax_to_hf SRC DST [--config CONFIG_JSON] [--task T]

SRC: a Flax checkpoint directory (convert.hf_to_flax), a pretraining run directory (its latest
RUN_DIR/checkpoints/<step>/ is used), one such step directory, or an HF directory / hub id.
DST loads with transformers.AutoModelForMaskedLM.from_pretrained(DST) (masked-LM checkpoints) or the
Auto class of its head.
"""

from __future__ import annotations

import argparse
import sys

from longformer_jax import conversion


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.flax_to_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="Flax checkpoint dir, pretraining run dir / step dir, or HF dir / hub id")
    p.add_argument("dst", help="output HF directory (must not exist or be empty)")
    p.add_argument("--config", default=None,
                   help="model config.json for a pretraining checkpoint (default: found beside it)")
    p.add_argument("--task", choices=conversion.TASKS, default=None,
                   help="model head (default: recorded in the checkpoint / inferred from the params)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return conversion.run_command(lambda: conversion.flax_to_hf(
        args.src, args.dst, config_path=args.config, task=args.task, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
