"""RoBERTa checkpoint -> long Longformer (the way kiddothe2b/longformer-base-4096 was made).

    python -m convert.roberta_to_longformer SRC DST --max-length 4096 --attention-window 128 [--format hf]

Position embeddings: RoBERTa's rows for real tokens copied in repeats up to the new length;
query/key/value_global copied from query/key/value; attention_window on every layer; the tokenizer
saved with model_max_length = max length. SRC may also be a Longformer: it is made longer the same
way (its position rows copied in repeats; its global projections, and its windows unless
--attention-window is given, kept), e.g. for documents split over devices (--mesh sequence=N):

    python -m convert.roberta_to_longformer kiddothe2b/longformer-base-4096 ckpt/long-64k --max-length 65536

--format: hf (config.json + model.safetensors), flax (an Orbax Flax checkpoint) or both (one
directory that is both).
"""

from __future__ import annotations

import argparse
import sys

from convert._cli import run_command
from longformer_jax.roberta import convert_roberta_to_longformer


def _windows(text: str) -> int | list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an even integer or a comma list of them") from e
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.roberta_to_longformer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src",
        help="RoBERTa checkpoint directory or hub id (e.g. FacebookAI/roberta-base), or a Longformer to make longer",
    )
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--max-length", type=int, default=4096, help="longest input in tokens (default 4096)")
    p.add_argument(
        "--attention-window",
        type=_windows,
        default=None,
        help="full window (both sides), even; one value or one per layer, comma-separated "
        "(default 128; a Longformer source keeps its own)",
    )
    p.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="rows of the position table (default max_length + pad_token_id + 2: 4099 for 4096, "
        "as in the seed checkpoint)",
    )
    p.add_argument(
        "--format",
        choices=("hf", "flax", "both"),
        default="hf",
        dest="output_format",
        help="hf: config.json + model.safetensors; flax: Orbax Flax checkpoint; both",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: convert_roberta_to_longformer(
            args.src,
            args.dst,
            max_length=args.max_length,
            attention_window=args.attention_window,
            output_format=args.output_format,
            max_position_embeddings=args.max_position_embeddings,
            overwrite=args.overwrite,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
