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

`mlm_objective` is masked-LM cross-entropy, the pretraining objective; fine-tuning objectives
are further instances.
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


def forward(model, params, batch: Batch, rng: jax.Array | None, deterministic: bool, *, num_global_slots: int,
            **head_args):
    """`model.apply` on a batch's ``input_ids``, ``attention_mask`` and ``global_attention_mask``
    (``head_args``: further keywords of the head, e.g. ``masked_positions``)."""
    masks = {k: batch[k] for k in ("attention_mask", "global_attention_mask")}
    rngs = None if deterministic else {"dropout": rng}
    return model.apply({"params": params}, batch["input_ids"], **masks, deterministic=deterministic,
                       num_global_slots=num_global_slots, rngs=rngs, **head_args)


def count_labels(batch: Batch) -> jax.Array:
    """The labels that count a loss (not ``IGNORE_INDEX``), as float32."""
    return jnp.sum(batch["labels"] != IGNORE_INDEX).astype(jnp.float32)


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
