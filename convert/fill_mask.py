"""Fill-mask with a Longformer masked-LM: top-k tokens for every <mask>, with scores.

    python -m convert.fill_mask MODEL "Hello I'm a <mask> model." [--top-k 5] [--global 0,5]

MODEL: a model directory (HF or a Flax checkpoint from convert.hf_to_flax) or a hub id; its
tokenizer files are used unless --tokenizer is given. Several texts may follow MODEL.
"""

from __future__ import annotations

import argparse
import json
import sys

from convert._cli import run_command
from longformer_jax.pipeline import fill_mask


def _positions(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated token positions or 'none'") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.fill_mask", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="model directory or hub id")
    p.add_argument("texts", nargs="+", help="text(s) with one or more <mask> tokens")
    p.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument(
        "--global",
        dest="global_attention",
        type=_positions,
        default=None,
        help="token positions with global attention, comma-separated, or 'none' (default: every <s>)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _print(text: str, result) -> None:
    per_mask = result if result and isinstance(result[0], list) else [result]
    print(text)
    for m, row in enumerate(per_mask):
        if len(per_mask) > 1:
            print(f"  mask {m + 1}:")
        for cand in row:
            print(f"  {cand['score']:.4f}  {cand['token_str']!r:>16}  {cand['sequence']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        results = fill_mask(
            args.model,
            args.texts,
            top_k=args.top_k,
            tokenizer=args.tokenizer,
            global_attention=args.global_attention,
            dtype=args.dtype,
        )
        if args.json:
            print(json.dumps(results[0] if len(args.texts) == 1 else results, indent=2))
            return
        for text, result in zip(args.texts, results, strict=True):
            _print(text, result)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
