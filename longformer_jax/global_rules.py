"""The automatic global attention of the task heads, as plain JAX functions of the token ids and masks.

The one home of where a head puts global attention when it is given no ``global_attention_mask``
(SPEC, Heads): sequence classification on ``<s>`` (position 0), question answering on the question
(every token before the first ``</s>``), multiple choice on every token after the first ``</s></s>``,
and the sentence-block heads on the first token of every non-empty block. No Flax in here: the heads
call these while tracing, and the serving loader (``longformer_jax.serving``) calls them on the host
through :func:`automatic_global_attention` with the rule's name from an exported model's manifest.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The rule of each task that has one (``tasks.TASKS[task].global_attention`` uses the same functions).
TASK_RULES = {
    "sequence-classification": "first-token",
    "question-answering": "question",
    "multiple-choice": "choices",
    "document-classification": "block-starts",
    "sequential-sentence-classification": "block-starts",
}


def concrete(x) -> np.ndarray | None:
    """``x`` as a numpy array when its value is known (not traced by jit), else None."""
    if x is None:
        return None
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def first_separator(input_ids, sep_token_id: int, what: str):
    """Index of the first separator of every row; HF requires exactly three per row."""
    ids = concrete(input_ids)
    if ids is not None:
        counts = (ids == sep_token_id).sum(-1)
        bad = np.nonzero(counts != 3)[0]
        if bad.size:
            r = int(bad[0])
            raise ValueError(
                f"{what}: row {r} holds {int(counts[r])} separator tokens (id {sep_token_id}) but exactly 3 are "
                "needed to place the global attention automatically (<s> question </s></s> context </s>); "
                "fix the input or pass global_attention_mask explicitly."
            )
    return jnp.argmax(jnp.asarray(input_ids) == sep_token_id, axis=-1)


def first_token_global_mask(input_ids) -> Array:
    """HF's sequence classification: global attention on position 0 (``<s>``)."""
    return jnp.zeros(jnp.shape(input_ids), jnp.int32).at[..., 0].set(1)


def question_global_attention_mask(input_ids, sep_token_id: int) -> Array:
    """Global attention on every token before the first separator (the question and ``<s>``)."""
    end = first_separator(input_ids, sep_token_id, "question answering")
    return (jnp.arange(input_ids.shape[-1])[None, :] < end[:, None]).astype(jnp.int32)


def choice_global_attention_mask(input_ids, sep_token_id: int) -> Array:
    """Global attention on every token after the first ``</s></s>`` (HF's multiple-choice rule)."""
    end = first_separator(input_ids, sep_token_id, "multiple choice")
    return (jnp.arange(input_ids.shape[-1])[None, :] > end[:, None] + 1).astype(jnp.int32)


def block_start_global_mask(attention_mask_BxL: Array, block_size: int) -> Array:
    """Global attention on the first token of every non-empty block of ``block_size`` tokens."""
    B, L = attention_mask_BxL.shape
    starts = (jnp.arange(L) % block_size == 0)[None, :]
    return (starts & (attention_mask_BxL != 0)).astype(jnp.int32)


def automatic_global_attention(
    rule: str | None, input_ids, attention_mask, *, sep_token_id: int, block_size: int = 128
) -> np.ndarray | None:
    """The (..., L) int32 mask of the rule named ``rule`` (:data:`TASK_RULES`) on concrete inputs; None: no rule.

    ``input_ids`` and ``attention_mask``: (..., L) arrays (multiple choice: (B, C, L), every choice a row).
    """
    if rule is None:
        return None
    ids = np.asarray(input_ids)
    flat_ids = ids.reshape(-1, ids.shape[-1])
    am = np.ones_like(flat_ids) if attention_mask is None else np.asarray(attention_mask).reshape(flat_ids.shape)
    rules: dict[str, Any] = {
        "first-token": lambda: first_token_global_mask(flat_ids),
        "question": lambda: question_global_attention_mask(flat_ids, sep_token_id),
        "choices": lambda: choice_global_attention_mask(flat_ids, sep_token_id),
        "block-starts": lambda: block_start_global_mask(am, block_size),
    }
    if rule not in rules:
        raise ValueError(f"global attention rule {rule!r} is unknown; expected one of {sorted(rules)} or none.")
    return np.asarray(rules[rule](), np.int32).reshape(ids.shape)
