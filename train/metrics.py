"""What a user watches: progress bar, TensorBoard, `metrics.jsonl`, and a PNG of the curves.

`python -m train.metrics RUN_DIR` redraws `RUN_DIR/curves.png` from `RUN_DIR/metrics.jsonl` at
any time (also while the run is going).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

LN2 = math.log(2.0)


def _scalar(v: Any) -> float | int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if isinstance(v, int) else f


class MetricsLogger:
    """Writes every record to metrics.jsonl and TensorBoard; only the first process writes."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # tensorboardX is a dependency; keep running without it
                self._tb = None

    def write(self, split: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"split": split, "step": int(step), "time": round(time.time(), 3)}
        for k, v in values.items():
            s = _scalar(v)
            if s is not None:
                rec[k] = s
                if self._tb is not None and math.isfinite(s):
                    self._tb.add_scalar(f"{split}/{k}", s, int(step))
        self._jsonl.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """tqdm bar over optimizer steps showing loss, tokens/s and the ETA (tqdm's own)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, smoothing=0.1
            )
        self._last_t = time.perf_counter()
        self._tokens = 0

    def update(self, n: int, tokens: int, **fields: Any) -> float:
        """Advances by `n` steps that processed `tokens` tokens; returns tokens/s since last call."""
        now = time.perf_counter()
        tps = tokens / max(now - self._last_t, 1e-9)
        self._last_t = now
        if self.bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
            shown["tok/s"] = f"{tps:,.0f}"
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
        return tps

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path} does not exist: pass the --output-dir of a training run.")
    recs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return recs


def eval_summary(first: dict[str, Any] | None, last: dict[str, Any]) -> str:
    """The line the training programs print at the end: `eval loss A -> B (bpc .., accuracy ..)`."""
    if not first:
        return f"eval loss {last['loss']:.4f} (bpc {last['bpc']:.3f}, accuracy {last['accuracy']:.3f})"
    return (
        f"eval loss {first['loss']:.4f} -> {last['loss']:.4f} (bpc {first['bpc']:.3f} -> {last['bpc']:.3f}, "
        f"accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f})"
    )


def run_title(run_dir: str | Path, evals: list[dict[str, Any]]) -> str:
    """A run's plot title: the command that made it (from its `config.json`) and the evaluation summary line
    the program printed (never the directory's name, which says nothing to a reader of a copied picture)."""
    path = Path(run_dir) / "config.json"
    lines = []
    if path.exists():
        cfg = json.loads(path.read_text())
        if "task" in cfg:
            lines.append(f"python -m train.finetune --preset {cfg.get('preset')} --task {cfg['task']}")
        elif cfg.get("preset") == "demo":
            lines.append("make demo: python -m train.pretrain --preset demo")
        else:
            lines.append(f"python -m train.pretrain --preset {cfg.get('preset')}")
    if evals and all(k in evals[-1] for k in ("loss", "bpc", "accuracy")):
        lines.append(eval_summary(evals[0] if len(evals) > 1 else None, evals[-1]))
    return "\n".join(lines)


def plot_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    loss_label: str = "MLM loss (nats / masked token)",
    metric: str = "accuracy",
    metric_label: str = "masked-token accuracy",
) -> Path:
    """Draws train/eval loss, train/eval `metric` (where the records hold it) and learning rate of a run into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    # A resumed run re-logs steps after its last checkpoint: keep the last record of each step.
    series: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "eval": {}}
    for r in recs:
        if r.get("split") in series:
            series[r["split"]][r["step"]] = r
    train = sorted(series["train"].items())
    evals = sorted(series["eval"].items())

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    fig.suptitle(run_title(run_dir, [r for _, r in evals]), fontsize=11)
    ax = axes[0]
    if train:
        ax.plot([s for s, _ in train], [r["loss"] for _, r in train], label="train loss", lw=1)
    if evals:
        ax.plot([s for s, _ in evals], [r["loss"] for _, r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel(loss_label)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax = axes[1]
    if train and metric in train[0][1]:
        ax.plot([s for s, _ in train], [r[metric] for _, r in train], label="train", lw=1)
    if evals and metric in evals[0][1]:
        ax.plot([s for s, _ in evals], [r[metric] for _, r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel(metric_label)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax = axes[2]
    if train and "lr" in train[0][1]:
        ax.plot([s for s, _ in train], [r["lr"] for _, r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.metrics", description="Plot the training and evaluation curves of a run."
    )
    p.add_argument("run_dir", help="the --output-dir of a training run (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
