"""The step loop of the training programs: steps, metrics, evaluation, checkpoints, stopping.

`TrainLoop.run(state, start_step)` trains to `max_steps` with any driver and objective:

- The host never waits for the step it has just dispatched. A step's metrics are read one step
  late (while the next step runs) and all at once before an evaluation or a save, so the device
  always has the next step queued.
- A non-finite loss or gradient norm stops the run at the first such step (`NonFiniteError`,
  naming it and the last good checkpoint). A state is saved only after the metrics of every
  step up to it were read and found finite, so a bad state is never checkpointed.
- Evaluation every `eval_every` steps (and at the end), checkpoints every `save_every` steps
  (and at the end), SIGTERM: save and stop (the same command resumes).
- An evaluation may ask the loop to stop (early stopping: `stop_reason`, set by a subclass's
  `evaluate`): the state is saved and the run ends with status "stopped".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from train import trainer


class NonFiniteError(RuntimeError):
    """A step produced a loss or gradient norm that is NaN or infinite."""


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    status: str  # "finished" | "preempted" | "stopped" (an evaluation set `stop_reason`)
    first_eval: dict[str, float] | None
    final_eval: dict[str, float]
    train_seconds: float  # from the end of the first (compiling) step to the end of the last
    steps_timed: int


def batch_fingerprint(batch: dict[str, Any]) -> str:
    """A short hash of a host batch's ``input_ids`` and ``labels`` (resume tests compare them)."""
    h = hashlib.sha1()
    for k in ("input_ids", "labels"):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()[:16]


def row_fingerprints(batch: dict[str, Any]) -> list[str]:
    """A short hash of each row's ``input_ids`` and ``labels``: compares the examples of runs with
    any number of processes (each process logs its rows of every global batch)."""
    ids, labels = np.asarray(batch["input_ids"]), np.asarray(batch["labels"])
    return [
        hashlib.sha1(np.ascontiguousarray(i).tobytes() + np.ascontiguousarray(lab).tobytes()).hexdigest()[:12]
        for i, lab in zip(ids.reshape(len(ids), -1), labels.reshape(len(labels), -1), strict=True)
    ]


class TrainLoop:
    """One run's loop: `cfg` (a `TrainConfig`) gives the steps, intervals and batch sizes.

    Args:
      driver: a `train.trainer.Driver` holding the objective.
      ckpt: the run's `train.checkpoint.Checkpointer`.
      train_it: this host's endless training batches (with `get_state`).
      eval_batches: this host's evaluation batches (may be empty).
      key: the run's dropout key (host array; the step folds in the step number).
      logger, progress: `train.metrics.MetricsLogger` and `Progress`.
      batch_log: an open file that gets a fingerprint of every batch, or None.
    """

    def __init__(self, cfg, driver, ckpt, train_it, eval_batches, *, key, logger, progress, batch_log=None):
        self.cfg, self.driver, self.ckpt = cfg, driver, ckpt
        self.train_it, self.eval_batches, self.key = train_it, eval_batches, np.asarray(key)
        self.logger, self.progress, self.batch_log = logger, progress, batch_log
        self.tokens_per_step = cfg.global_batch_size * cfg.seq_len
        self._pending: list[tuple[int, Any]] = []  # (step, metrics on the device), oldest first
        self._interval: dict[str, float] = {}
        self._stop_signal: int | None = None
        self.stop_reason: str | None = None  # set by an evaluation to end the run (early stopping)

    # --- pieces ---
    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        """The host batch (A, B, ...) of optimizer step `step` (A = accumulation steps)."""
        micro = []
        for a in range(self.cfg.grad_accum_steps):
            try:
                b = next(self.train_it)
            except StopIteration:
                raise ValueError(
                    f"the training data ran out at step {step}; the train iterator must repeat (epochs) - check --data."
                ) from None
            if self.batch_log is not None:
                self.batch_log.write(
                    json.dumps({"step": step, "micro": a, "hash": batch_fingerprint(b), "rows": row_fingerprints(b)})
                    + "\n"
                )
            micro.append(b)
        return trainer.stack_micro_batches(micro)

    def drain(self, keep: int = 0) -> None:
        """Reads the metrics of all pending steps but the newest `keep`, in order: finiteness, log."""
        while len(self._pending) > keep:
            step, m = self._pending.pop(0)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                self._pending.clear()
                self.ckpt.wait()
                good = self.ckpt.latest_step()
                raise NonFiniteError(
                    f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; the run "
                    f"stopped without saving this state. The last good checkpoint is "
                    f"{'step ' + str(good) if good is not None else 'none'} in {self.ckpt.directory}. "
                    "Lower --learning-rate, check the data, or train in --dtype float32."
                )
            self._log_step(step, m)

    def _log_step(self, step: int, m: dict[str, float]) -> None:
        names = ("loss", *self.driver.objective.metrics)
        for k in names:
            self._interval[k] = self._interval.get(k, 0.0) + m[k]
        self._interval["steps"] = self._interval.get("steps", 0) + 1
        tps = self.progress.update(1, self.tokens_per_step, loss=m["loss"], lr=m.get("lr", 0.0))
        if step % self.cfg.log_every == 0 or step == self.cfg.max_steps:
            n = self._interval.pop("steps")
            rec = {k: self._interval.pop(k) / n for k in names}
            rec.update(
                grad_norm=m["grad_norm"],
                lr=m.get("lr", float("nan")),
                tokens_per_s=tps,
                examples_seen=step * self.cfg.global_batch_size,
            )
            self.logger.write("train", step, rec)

    def evaluate(self, state, step: int) -> dict[str, float]:
        """The objective's means over every evaluation batch, logged as split "eval"."""
        sums = jax.device_get([self.driver.evaluate(state, b) for b in self.eval_batches])
        res = trainer.finish_eval(sums, self.driver.objective)
        if res:
            self.logger.write("eval", step, res)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in res.items() if k != "count")
            self.progress.write(f"step {step}: eval {shown}")
        return res

    def checkpoint_meta(self, step: int) -> dict[str, Any]:
        """The JSON saved with the checkpoint of `step` (a subclass adds its own state)."""
        return {"step": step, "fingerprint": self.cfg.fingerprint(), "examples_seen": step * self.cfg.global_batch_size}

    def save(self, state, step: int) -> None:
        """Starts an asynchronous save of `state` (whose metrics must have been read)."""
        self.ckpt.save(step, self.driver.for_save(state), self.train_it.get_state(), self.checkpoint_meta(step))

    # --- the loop ---
    def run(self, state, start_step: int) -> LoopResult:
        cfg = self.cfg
        in_main = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if in_main else None
        try:
            first_eval = None
            last_eval: dict[str, float] = {}
            if start_step == 0 and self.eval_batches:
                first_eval = last_eval = self.evaluate(state, 0)
            step, status, steps_timed, t_loop = start_step, "finished", 0, time.perf_counter()
            while step < cfg.max_steps:
                state, metrics = self.driver.train(state, self.next_batch(step), self.key)
                step += 1
                self._pending.append((step, metrics))
                if step == start_step + 1:  # leave the first step (compilation) out of the timing
                    jax.block_until_ready(state.step)
                    t_loop = time.perf_counter()
                else:
                    steps_timed += 1
                evaluate = step % cfg.eval_every == 0 and step != cfg.max_steps and bool(self.eval_batches)
                save = step % cfg.save_every == 0 or step == cfg.max_steps or self._stop_signal is not None
                self.drain(keep=0 if evaluate or save else 1)
                if evaluate:
                    last_eval = self.evaluate(state, step)
                if save or self.stop_reason is not None:
                    self.save(state, step)
                if self.stop_reason is not None:
                    self.ckpt.wait()
                    status = "stopped"
                    self.progress.write(f"step {step}: {self.stop_reason}")
                    break
                if self._stop_signal is not None:
                    self.ckpt.wait()
                    status = "preempted"
                    self.progress.write(
                        f"SIGTERM: saved step {step} to {self.ckpt.directory}; rerun the same command to resume."
                    )
                    break
            self.drain()
            train_seconds = time.perf_counter() - t_loop
            if status == "finished" and self.eval_batches:
                last_eval = self.evaluate(state, step)
            self.ckpt.wait()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        return LoopResult(state, step, status, first_eval, last_eval, train_seconds, steps_timed)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_signal = signum
