"""Hugging Face (PyTorch) Longformer -> Flax checkpoint directory.

    python -m convert.hf_to_flax SRC DST [--task T] [--verify]

SRC: a local HF directory (config.json + model.safetensors or pytorch_model.bin) or a hub id.
DST: a new directory with config.json, the tokenizer files, flax_params/ (Orbax) and
longformer_jax.json; `longformer_jax.load_pretrained(DST)` and the pretraining program read it.
"""

from __future__ import annotations

import argparse
import sys

from longformer_jax import conversion


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.hf_to_flax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HF checkpoint directory or hub id (e.g. kiddothe2b/longformer-base-4096)")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--task", choices=conversion.TASKS, default=None,
                   help="model head; default: from config.json's `architectures` / the weight names")
    p.add_argument("--verify", action="store_true",
                   help="run the PyTorch and the Flax model on one random input (padding, a few global "
                        "tokens) and print the max abs difference")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="with --verify: fail (exit 1, nothing written) above this max abs diff")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        summary = conversion.hf_to_flax(args.src, args.dst, args.task, verify=args.verify,
                                        overwrite=args.overwrite,
                                        tolerance=args.tolerance if args.verify else None)
        if args.verify:
            print(f"max abs diff PyTorch vs Flax: {summary['max_abs_diff']:.3e}")

    return conversion.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
