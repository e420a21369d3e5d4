"""The fine-tuning table of docs/finetuning.md in one command: ``python -m bench.finetune_table --init MODEL``.

For each offline task of ``train/demo_tasks.py`` (built into ``OUT/tasks`` unless ``--tasks`` names a
folder of them) this prints, on the held-out test split: chance (the train split's majority label, and a
uniform draw), the scikit-learn bag-of-words baseline of ``bench/finetune_baselines.py``, and the model
``--init`` fine-tuned by ``python -m train.finetune --preset demo`` for the fixed budget of ``BUDGETS``
(the same steps, learning rate, sequence length, block size and evaluation interval on every machine; the
minutes are this machine's). ``--init``: a model of at least 512 tokens, e.g. the ``make demo`` model made
longer: ``python -m convert.roberta_to_longformer runs/demo/hf runs/demo-1k --max-length 1024``.
Each fine-tuning run is a fresh process writing ``OUT/<task>/``;
the table is printed and written to ``OUT/finetune_table.md`` (the numbers also to
``OUT/finetune_table.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import finetune_baselines as baselines

# Fixed budgets for the demo model (hidden 128, 2 layers; `make demo`, made 1,024 tokens long by
# convert.roberta_to_longformer) on 2 CPU cores: a few minutes each. Sequence length and block size are fixed
# here, not taken from the base model: blocks of 32 tokens (the demo pretraining layout) where a block holds
# running text, of 128 where a block is one labelled paragraph (sequential sentence classification). Multiple
# choice is scored by the masked-LM head at the context's <mask> (--choice-scoring masked-lm): with transformers'
# head on <s> this base stays at chance (bench/finetune_table.md).
BUDGETS: dict[str, list[str]] = {
    "document-classification": [
        "--seq-len",
        "512",
        "--block-size",
        "32",
        "--max-steps",
        "448",
        "--eval-every",
        "32",
        "--learning-rate",
        "1e-3",
        "--patience",
        "0",
    ],
    "sequential-sentence-classification": [
        "--seq-len",
        "512",
        "--block-size",
        "128",
        "--max-steps",
        "320",
        "--eval-every",
        "160",
        "--learning-rate",
        "1e-3",
    ],
    "multiple-choice": [
        "--choice-scoring",
        "masked-lm",
        "--seq-len",
        "256",
        "--block-size",
        "32",
        "--max-steps",
        "600",
        "--eval-every",
        "100",
        "--learning-rate",
        "1e-3",
        "--patience",
        "0",
    ],
    "question-answering": [
        "--seq-len",
        "512",
        "--block-size",
        "32",
        "--max-steps",
        "400",
        "--eval-every",
        "100",
        "--learning-rate",
        "1e-3",
        "--context-field",
        "text",
        "--max-negative-windows",
        "1",
    ],
}
# The metrics shown per task: (metric of eval_results.json, metric of the baselines, label).
SHOWN: dict[str, list[tuple[str, str, str]]] = {
    "document-classification": [("accuracy", "accuracy", "accuracy"), ("macro_f1", "macro_f1", "macro-F1")],
    "sequential-sentence-classification": [
        ("accuracy", "accuracy", "accuracy (= micro-F1)"),
        ("macro_f1", "macro_f1", "macro-F1"),
    ],
    "multiple-choice": [("accuracy", "accuracy", "accuracy")],
    "question-answering": [("exact_match", "accuracy", "exact match")],
}


def _baselines(task_dir: str) -> dict[str, dict[str, float]]:
    """method kind -> test scores: majority, uniform, bag-of-words (the best variant), with its name."""
    out: dict[str, dict] = {}
    for split, _, method, scores in baselines.task_rows(task_dir):
        if split != "test":
            continue
        kind = "majority" if method == "majority" else "uniform" if method.startswith("uniform") else "bag-of-words"
        if kind != "bag-of-words" or "accuracy" not in out.get(kind, {}) or scores["accuracy"] >= out[kind]["accuracy"]:
            out[kind] = {**scores, "method": method}
    return out


def finetune(task: str, init: str, task_dir: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    """(eval_results.json, minutes) of one fine-tuning run in a fresh process."""
    cmd = [
        sys.executable,
        "-m",
        "train.finetune",
        "--preset",
        "demo",
        "--task",
        task,
        "--init",
        init,
        "--data",
        task_dir,
        "--output-dir",
        str(out),
        "--overwrite",
        "--no-progress-bar",
        *BUDGETS[task],
        *extra,
    ]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    t = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"fine-tuning {task} failed (exit {p.returncode}); its output is above")
    return json.loads((out / "eval_results.json").read_text()), (time.time() - t) / 60


def render(rows: list[dict]) -> str:
    lines = [
        "| task | test examples | metric | majority | uniform | bag-of-words | fine-tuned | steps | minutes |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(d, k):
        return f"{d[k]:.3f}" if d and k in d else "–"

    for r in rows:
        for ours, theirs, label in SHOWN[r["task"]]:
            b = r["baselines"]
            lines.append(
                f"| {r['task']} | {r['examples']:,} {r['unit']} | {label} | {cell(b.get('majority'), theirs)} "
                f"| {cell(b.get('uniform'), theirs)} | {cell(b.get('bag-of-words'), theirs)} | "
                f"**{r['test'][ours]:.3f}** | {r['steps']} | {r['minutes']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.finetune_table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--init",
        required=True,
        help="the model to fine-tune, of 512+ tokens (e.g. `make demo`'s runs/demo/hf made 1,024 tokens "
        "long by convert.roberta_to_longformer)",
    )
    p.add_argument("--output", default="runs/finetune-table", help="where the tasks, runs and table go")
    p.add_argument("--tasks", default=None, help="a folder of built tasks (default: build them into OUTPUT/tasks)")
    p.add_argument("--task", action="append", choices=list(BUDGETS), help="a task to run (repeatable; default all)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train.finetune flags for every run")
    args = p.parse_args(argv)
    out = Path(args.output).absolute()
    tasks_dir = Path(args.tasks) if args.tasks else out / "tasks"
    chosen = args.task or list(BUDGETS)
    missing = [t for t in chosen if not (tasks_dir / t / "train.jsonl").is_file()]
    if missing:
        if args.tasks:
            print(
                f"error: {tasks_dir} lacks {missing}; build them: python -m train.demo_tasks --output {tasks_dir}",
                file=sys.stderr,
            )
            return 1
        from train.demo_tasks import build_tasks

        build_tasks(str(tasks_dir), missing)
    extra = [a for a in (args.extra or []) if a != "--"]
    rows = []
    for task in chosen:
        task_dir = str(tasks_dir / task)
        results, minutes = finetune(task, args.init, task_dir, out / task, extra)
        with open(os.path.join(task_dir, "test.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        unit = baselines._unit(task_dir)
        if unit == "blocks":  # scored per block: both counts
            unit = f"documents ({sum(len(r['labels']) for r in records):,} blocks)"
        rows.append(
            {
                "task": task,
                "examples": len(records),
                "unit": unit,
                "test": results["test"],
                "validation": results["validation"],
                "baselines": _baselines(task_dir),
                "minutes": minutes,
                "steps": results["steps"],
                "best_step": results["best_step"],
            }
        )
    table = render(rows)
    report = (
        f"Fine-tuning `{args.init}` (`python -m bench.finetune_table`), test split of the offline tasks; "
        f"budgets: {json.dumps(BUDGETS)}\n\n{table}\n"
    )
    (out / "finetune_table.md").write_text(report)
    (out / "finetune_table.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
