"""Any params this project produces -> Hugging Face directory (config.json, model.safetensors, tokenizer).

    python -m convert.flax_to_hf SRC DST [--task T] [--step N]

SRC: a Flax checkpoint directory (convert.hf_to_flax), an HF directory / hub id, or a pretraining
run directory (RUN_DIR with checkpoints/ and model/config.json; its latest checkpoint, or --step N,
is exported by train.export; RUN_DIR/checkpoints and RUN_DIR/checkpoints/<step> are read the same way).
DST loads with transformers.AutoModelForMaskedLM.from_pretrained(DST) (masked-LM checkpoints) or the
Auto class of its head.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from convert._cli import run_command
from longformer_jax.pretrained import (
    check_destination,
    load_checkpoint,
    save_hf_checkpoint,
    tokenizer_note,
)
from longformer_jax.tasks import TASKS


def run_directory(path: str | os.PathLike) -> tuple[Path, int | None] | None:
    """``(run_dir, step)`` when ``path`` is a pretraining run directory (one holding ``checkpoints/`` and
    ``model/config.json``), its ``checkpoints/`` directory or one step directory in it; else None."""
    p = Path(path).expanduser()

    def is_run(d: Path) -> bool:
        return (d / "checkpoints").is_dir() and (d / "model" / "config.json").is_file()

    if is_run(p):
        return p, None
    if p.name == "checkpoints" and is_run(p.parent):
        return p.parent, None
    if p.name.isdigit() and p.parent.name == "checkpoints" and is_run(p.parent.parent):
        return p.parent.parent, int(p.name)
    return None


def flax_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    task: str | None = None,
    step: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """A Flax checkpoint, HF directory / hub id or pretraining run -> an HF directory. Returns a summary."""
    run = run_directory(src)
    if run is not None:
        if task is not None:
            raise ValueError(
                f"--task does not apply to the run directory {run[0]} (its model is a masked LM); "
                "export it first, then convert the export with --task."
            )
        from train.export import export_run  # the trainer's side: it knows the run directory's layout

        return export_run(
            run[0], dst, step=step if step is not None else run[1], output_format="hf", overwrite=overwrite, log=log
        )
    if step is not None:
        raise ValueError(
            f"--step applies to pretraining run directories; {src} is not one "
            "(no checkpoints/ and model/config.json in it)."
        )
    check_destination(dst, overwrite=overwrite)
    config, task, params, directory = load_checkpoint(src, task)
    copied = save_hf_checkpoint(dst, config, params, task, tokenizer=directory, overwrite=overwrite)
    log(f"wrote HF checkpoint {dst} (task {task}, architectures {TASKS[task].hf_architecture})")
    log(tokenizer_note(src, copied))
    return {"task": task, "dst": str(dst), "tokenizer_files": copied}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.flax_to_hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", help="Flax checkpoint dir, HF dir / hub id, or pretraining run dir")
    p.add_argument("dst", help="output HF directory (must not exist or be empty)")
    p.add_argument(
        "--task",
        choices=list(TASKS),
        default=None,
        help="model head (default: the checkpoint's own); another task keeps the encoder",
    )
    p.add_argument(
        "--step",
        type=int,
        default=None,
        help="for a pretraining run directory: the checkpoint step to export (default: the latest)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: flax_to_hf(args.src, args.dst, task=args.task, step=args.step, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
