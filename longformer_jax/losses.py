"""The losses of the heads and of the trainer: one cross-entropy, HF's classification rule.

``IGNORE_INDEX`` (-100) marks a label that counts no loss, as in ``torch.nn.CrossEntropyLoss``.
``cross_entropy_sums`` returns sums (loss, correct predictions, counted labels) so that a mean
over many batches, micro-batches or devices is exact; ``cross_entropy`` is their mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

IGNORE_INDEX = -100


def cross_entropy_sums(logits_NxV: Array, labels_N: Array, ignore_index: int = IGNORE_INDEX):
    """(summed cross-entropy, correct argmax predictions, counted labels) over labels != ``ignore_index``.

    ``logits`` (..., V) and ``labels`` (...) of any matching leading shape; sums are float32."""
    valid = labels_N != ignore_index
    safe = jnp.where(valid, labels_N, 0)
    logits_NxV = logits_NxV.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_NxV, safe)
    loss_sum = jnp.sum(jnp.where(valid, ce, 0.0))
    correct = jnp.sum(jnp.where(valid, jnp.argmax(logits_NxV, -1) == safe, False))
    return loss_sum, correct.astype(jnp.float32), jnp.sum(valid).astype(jnp.float32)


def cross_entropy(logits: Array, labels: Array, ignore_index: int = IGNORE_INDEX) -> Array:
    """Mean cross-entropy over the labels that are not ``ignore_index`` (torch's CrossEntropyLoss)."""
    loss_sum, _, count = cross_entropy_sums(logits, labels, ignore_index)
    return loss_sum / count


def classification_loss(config, logits: Array, labels: Array) -> Array:
    """HF's problem_type rule: regression (MSE), single-label (CE) or multi-label (BCE).

    ``config`` is a ``LongformerConfig`` (its ``problem_type`` and ``num_labels``)."""
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    logits = logits.astype(jnp.float32)
    if problem == "regression":
        if config.num_labels == 1:
            return jnp.mean((jnp.squeeze(logits) - jnp.squeeze(labels).astype(jnp.float32)) ** 2)
        return jnp.mean((logits - labels.astype(jnp.float32)) ** 2)
    if problem == "single_label_classification":
        return cross_entropy(logits.reshape(-1, config.num_labels), labels.reshape(-1))
    if problem == "multi_label_classification":
        y = labels.astype(jnp.float32)
        return jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    raise ValueError(
        f"problem_type={problem!r}; expected 'regression', 'single_label_classification' or "
        "'multi_label_classification'."
    )
