"""What a training step minimises: the objectives, one per kind of training, behind one interface.

An `Objective` tells the trainer's steps (`train.trainer`) what to compute on a micro-batch:

- `sums(model, params, batch, rng, deterministic) -> (loss_sum, {name: sum})`: the loss summed
  over the micro-batch, and named metric sums (e.g. correct predictions). Sums, not means, so
  that a mean over micro-batches, devices and evaluation batches is exact.
- `count(batch) -> float32 scalar`: how many things the loss is a mean of (e.g. the labels that
  are not -100), read from the batch alone with any leading dimensions. The train step takes it
  over the whole step (every micro-batch on every device) and divides the loss and each metric
  by it, so A micro-batches of B give the same update as one of A*B.
- `metrics`: the names of the metric sums (their means carry the same names);
  `derived(means)`: further numbers computed from the means (e.g. bits per token).
- `predict` (optional): `predict(model, params, batch) -> (sums, outputs)`: from one deterministic
  forward pass, the sums `sums` gives (the loss as ``"loss"``) and per-row outputs (logits, ...)
  for scoring predictions on the host (`train.trainer.make_predict_step`).

`mlm_objective` is masked-LM cross-entropy, the pretraining objective; `classification_objective`
(every head with ``logits``, single- or multi-label), `span_objective` (extractive question
answering) and `masked_lm_choice_objective` (multiple choice scored by the masked-LM head at a
``<mask>``) are those of fine-tuning (`train.finetune`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from longformer_jax.losses import IGNORE_INDEX, cross_entropy_sums

Batch = dict[str, Any]
LN2 = math.log(2.0)


def _nothing_derived(means: dict[str, float]) -> dict[str, float]:
    return {}


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss of a training program; see the module docstring."""

    sums: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    count: Callable[[Batch], jax.Array]
    metrics: tuple[str, ...] = ()
    derived: Callable[[dict[str, float]], dict[str, float]] = _nothing_derived
    predict: Callable[..., tuple[dict[str, jax.Array], dict[str, jax.Array]]] | None = None


def forward(
    model, params, batch: Batch, rng: jax.Array | None, deterministic: bool, *, num_global_slots: int, **head_args
):
    """`model.apply` on a batch's ``input_ids``, ``attention_mask`` and ``global_attention_mask``
    (``head_args``: further keywords of the head, e.g. ``masked_positions``)."""
    masks = {k: batch[k] for k in ("attention_mask", "global_attention_mask")}
    rngs = None if deterministic else {"dropout": rng}
    return model.apply(
        {"params": params},
        batch["input_ids"],
        **masks,
        deterministic=deterministic,
        num_global_slots=num_global_slots,
        rngs=rngs,
        **head_args,
    )


def bits_per_token(means: dict[str, float]) -> dict[str, float]:
    """The Longformer paper's "bpc": the masked-token loss in bits (loss / ln 2)."""
    return {"bpc": means["loss"] / LN2}


def _mlm_labels(batch: Batch) -> jax.Array:
    """The labels the MLM loss is over: ``masked_labels`` (one per slot) when the batch has slots."""
    return batch["masked_labels"] if "masked_positions" in batch else batch["labels"]


def count_mlm_labels(batch: Batch) -> jax.Array:
    """The MLM labels that count a loss (not ``IGNORE_INDEX``), as float32."""
    return jnp.sum(_mlm_labels(batch) != IGNORE_INDEX).astype(jnp.float32)


def mlm_objective(num_global_slots: int) -> Objective:
    """Masked-LM cross-entropy over the labels that are not -100; metric: accuracy of the argmax.

    A batch made by ``train.masking.mask_tokens`` carries ``masked_positions`` / ``masked_labels``
    (B, K): the LM head then runs only at those K slots (``LongformerForMaskedLM``'s
    ``masked_positions``), the same loss as full logits over ``labels`` (B, L) at K/L of the head's
    cost. A batch with only ``labels`` gets the full-vocabulary logits at every position.

    ``num_global_slots``: the static bound of global tokens per row (see ``LongformerModel``).
    """

    def sums(model, params, batch: Batch, rng, deterministic: bool):
        head_args = {"masked_positions": batch["masked_positions"]} if "masked_positions" in batch else {}
        out = forward(model, params, batch, rng, deterministic, num_global_slots=num_global_slots, **head_args)
        loss_sum, correct, _ = cross_entropy_sums(out.logits, _mlm_labels(batch))
        return loss_sum, {"accuracy": correct}

    return Objective(sums=sums, count=count_mlm_labels, metrics=("accuracy",), derived=bits_per_token)


# ----------------------------------------------------------------------------------------------
# Fine-tuning objectives (train.finetune): one forward pass, the loss from the head's outputs


def _label_sums(logits: jax.Array, labels: jax.Array, multi_label: bool) -> tuple[jax.Array, jax.Array]:
    """(loss sum, correct predictions) over the labelled positions of ``logits`` (..., K).

    Single-label: ``labels`` (...) ints, -100 where nothing counts; cross-entropy, argmax correct.
    Multi-label: ``labels`` (..., K) of 0/1, a row of -100 where nothing counts; binary cross-entropy
    averaged over the K labels (HF's ``BCEWithLogitsLoss`` per row), a row correct when every
    sigmoid > 0.5 decision is (scikit-learn's subset accuracy).
    """
    if not multi_label:
        loss_sum, correct, _ = cross_entropy_sums(logits, labels)
        return loss_sum, correct
    x = logits.astype(jnp.float32)
    valid = labels[..., 0] != IGNORE_INDEX
    y = jnp.where(valid[..., None], labels, 0).astype(jnp.float32)
    bce = jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))), axis=-1)
    exact = jnp.all((x > 0) == (y > 0.5), axis=-1)
    return jnp.sum(jnp.where(valid, bce, 0.0)), jnp.sum(valid & exact).astype(jnp.float32)


def classification_objective(num_global_slots: int, multi_label: bool = False) -> Objective:
    """The loss of any head whose output is ``logits`` (..., K) against ``labels``: document and
    sequence classification (B, K), multiple choice (B, choices), sequential sentence
    classification (B, blocks, K), token classification (B, L, K). See ``_label_sums``.

    Metric ``accuracy`` (per labelled position); ``predict`` gives the ``logits``.
    """

    def logits_of(model, params, batch, rng, deterministic):
        return forward(model, params, batch, rng, deterministic, num_global_slots=num_global_slots).logits

    def sums(model, params, batch: Batch, rng, deterministic: bool):
        loss_sum, correct = _label_sums(
            logits_of(model, params, batch, rng, deterministic), batch["labels"], multi_label
        )
        return loss_sum, {"accuracy": correct}

    def predict(model, params, batch: Batch):
        logits = logits_of(model, params, batch, None, True)
        loss_sum, correct = _label_sums(logits, batch["labels"], multi_label)
        return {"loss": loss_sum, "accuracy": correct}, {"logits": logits.astype(jnp.float32)}

    def count(batch: Batch) -> jax.Array:
        labels = batch["labels"]
        return jnp.sum(labels[..., 0] != IGNORE_INDEX if multi_label else labels != IGNORE_INDEX).astype(jnp.float32)

    return Objective(sums=sums, count=count, metrics=("accuracy",), predict=predict)


def span_objective(num_global_slots: int) -> Objective:
    """Extractive question answering: (CE of the start + CE of the end) / 2 per example (HF's loss),
    against ``start_positions`` / ``end_positions`` (B,), -100 on rows that count nothing.

    Metric ``exact`` (start and end both the argmax); ``predict`` gives ``start_logits``, ``end_logits``.
    """

    def span_sums(out, batch: Batch):
        ls, cs, _ = cross_entropy_sums(out.start_logits, batch["start_positions"])
        le, _, _ = cross_entropy_sums(out.end_logits, batch["end_positions"])
        hit = (jnp.argmax(out.start_logits, -1) == batch["start_positions"]) & (
            jnp.argmax(out.end_logits, -1) == batch["end_positions"]
        )
        return (ls + le) / 2, {"exact": jnp.sum(hit).astype(jnp.float32)}

    def sums(model, params, batch: Batch, rng, deterministic: bool):
        return span_sums(forward(model, params, batch, rng, deterministic, num_global_slots=num_global_slots), batch)

    def predict(model, params, batch: Batch):
        out = forward(model, params, batch, None, True, num_global_slots=num_global_slots)
        loss_sum, metrics = span_sums(out, batch)
        return {"loss": loss_sum, **metrics}, {
            "start_logits": out.start_logits.astype(jnp.float32),
            "end_logits": out.end_logits.astype(jnp.float32),
        }

    def count(batch: Batch) -> jax.Array:
        return jnp.sum(batch["start_positions"] != IGNORE_INDEX).astype(jnp.float32)

    return Objective(sums=sums, count=count, metrics=("exact",), predict=predict)


def choice_token_scores(logits: jax.Array, choice_ids: jax.Array, choice_mask: jax.Array) -> jax.Array:
    """(B, C): each choice's mean log-probability of its tokens under the masked-LM ``logits`` (B, V) of
    one position; ``choice_ids`` / ``choice_mask`` (B, C, T), the mask 1 on a choice's tokens."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    b, c, t = choice_ids.shape
    picked = jnp.take_along_axis(log_probs, choice_ids.reshape(b, c * t), axis=-1).reshape(b, c, t)
    weight = choice_mask.astype(jnp.float32)
    return jnp.sum(picked * weight, axis=-1) / jnp.maximum(jnp.sum(weight, axis=-1), 1.0)


def masked_lm_choice_objective(num_global_slots: int) -> Objective:
    """Multiple choice scored by the masked-LM head at the context's ``<mask>`` (cloze-style tasks): one row
    per record (``masked_positions`` (B, 1)), a choice's score the mean log-probability of its tokens there
    (``choice_token_scores``), cross-entropy over the choices against ``labels`` (B,).

    Metric ``accuracy``; ``predict`` gives the scores as ``logits`` (B, choices), as the ``cls`` head does.
    """

    def scores_of(model, params, batch: Batch, rng, deterministic: bool) -> jax.Array:
        out = forward(
            model,
            params,
            batch,
            rng,
            deterministic,
            num_global_slots=num_global_slots,
            masked_positions=batch["masked_positions"],
        )
        return choice_token_scores(out.logits[:, 0], batch["choice_ids"], batch["choice_mask"])

    def sums(model, params, batch: Batch, rng, deterministic: bool):
        loss_sum, correct = _label_sums(scores_of(model, params, batch, rng, deterministic), batch["labels"], False)
        return loss_sum, {"accuracy": correct}

    def predict(model, params, batch: Batch):
        scores = scores_of(model, params, batch, None, True)
        loss_sum, correct = _label_sums(scores, batch["labels"], False)
        return {"loss": loss_sum, "accuracy": correct}, {"logits": scores}

    def count(batch: Batch) -> jax.Array:
        return jnp.sum(batch["labels"] != IGNORE_INDEX).astype(jnp.float32)

    return Objective(sums=sums, count=count, metrics=("accuracy",), predict=predict)
