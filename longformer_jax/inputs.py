"""Input preparation: the one home of what happens to the inputs before the traced model runs.

``prepare_inputs(config, input_ids, attention_mask=..., global_attention_mask=..., ...)`` checks the
inputs (a ValueError naming the problem and the fix for what would otherwise be an XLA shape error
or silent garbage), merges the masks into HF's one mask (0 pad, 1 local, 2 global), makes RoBERTa
position ids, pads everything to a multiple of the largest attention window (HF's
``_pad_to_window_size``; with dilated windows, of ``config.pad_multiple``: every window times its
dilations) and chooses the static number of global slots ``G``. It returns a :class:`ModelInputs`: a
pytree of the padded arrays whose static fields (``num_global_slots``, ``length``, ``global_columns``)
fix every shape that jit sees.

``LongformerModel`` calls it on its arguments, so eager use needs nothing else. With concrete
masks ``G`` is chosen from them, rounded up to a bucket (0, 1, 2, 4, 8, ...), so a handful of
compilations serve all inputs. Under ``jit`` the masks are traced: pass ``num_global_slots`` (a row
with more global tokens than slots then yields NaN, never silently wrong numbers; with concrete
masks it is a ValueError), or prepare the inputs outside jit and pass the ``ModelInputs`` to
``LongformerModel`` as its ``input_ids``.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from longformer_jax.config import LongformerConfig
from longformer_jax.global_rules import concrete

Array = jax.Array


@flax.struct.dataclass
class ModelInputs:
    """The encoder's inputs, padded to the window multiple, with the static facts that fix the shapes.

    Arrays are (B, L_padded) int32 (``inputs_embeds`` (B, L_padded, E)); exactly one of ``input_ids``
    and ``inputs_embeds`` is set. Static (not traced; part of jit's cache key): ``num_global_slots``
    ``G``, ``length`` (the input's own length: outputs are cut back to it) and ``global_columns`` (the
    global columns kept in the returned attentions: the batch's largest count when ``G`` was chosen
    from the masks, else ``G``).
    """

    input_ids: Array | None
    inputs_embeds: Array | None
    mask: Array  # HF's merged mask: 0 pad, 1 local, 2 global
    token_type_ids: Array
    position_ids: Array
    num_global_slots: int = flax.struct.field(pytree_node=False)
    length: int = flax.struct.field(pytree_node=False)
    global_columns: int = flax.struct.field(pytree_node=False)


def pow2_bucket(n: int) -> int:
    """Round ``n`` up to a bucket: 0 (for ``n <= 0``), 1, 2, 4, 8, 16, ..."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


# The number of global slots chosen for a batch whose rows hold at most ``n`` global tokens.
global_slot_bucket = pow2_bucket


def position_ids_from_input_ids(input_ids: Array, pad_token_id: int) -> Array:
    """RoBERTa positions: real tokens get pad+1, pad+2, ...; pads keep ``pad`` (SPEC, Embeddings)."""
    mask = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + pad_token_id


def check_inputs(config: LongformerConfig, shape, input_ids, masks: dict[str, Any]) -> None:
    """Clear errors for user mistakes that would otherwise be XLA shape errors or silent garbage."""
    if len(shape) != 2:
        raise ValueError(
            f"input_ids must have shape (batch, sequence_length), got shape {tuple(shape)}; "
            "add a batch axis with input_ids[None]."
        )
    length = shape[1]
    ids = concrete(input_ids)
    if length > config.max_sequence_length:
        # Pads take no position, so a longer row is fine when its real tokens fit (as in HF).
        real = int((ids != config.pad_token_id).sum(-1).max()) if ids is not None else length
        if real > config.max_sequence_length:
            raise ValueError(
                f"sequence length {real} exceeds the model's limit max_position_embeddings - pad_token_id - 1 = "
                f"{config.max_sequence_length} (max_position_embeddings={config.max_position_embeddings}); "
                "truncate the input or extend the position embeddings "
                "(python -m convert.roberta_to_longformer --max-length)."
            )
    for name, m in masks.items():
        if m is not None and tuple(m.shape[:2]) != tuple(shape):
            raise ValueError(
                f"{name} has shape {tuple(m.shape)} but input_ids has shape {tuple(shape)}; "
                f"pass one {name} value per token."
            )
    if ids is not None and ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = hi if hi >= config.vocab_size else lo
            raise ValueError(
                f"input_ids holds token id {bad}, outside the vocabulary [0, {config.vocab_size}); "
                "was the text tokenized with this model's tokenizer?"
            )


def choose_global_slots(mask_BxL: Array, num_global_slots: int | None) -> tuple[int, int]:
    """(static number of global slots, global columns to keep in the attentions) for a merged mask.

    With a concrete mask: ``num_global_slots`` or, when None, the bucket of the largest number of
    global tokens in a row; a row with more global tokens than the slots given is a ValueError.
    With a traced mask ``num_global_slots`` is required."""
    counts = concrete(mask_BxL)
    if counts is None:
        if num_global_slots is None:
            raise ValueError(
                "num_global_slots must be given when the masks are traced (under jit/pmap/grad of the "
                "inputs): pass num_global_slots=<the largest number of global tokens a row may hold>, "
                "or 0 for none."
            )
        return num_global_slots, num_global_slots
    per_row = (counts == 2).sum(-1)
    largest = int(per_row.max()) if per_row.size else 0
    if num_global_slots is None:
        return global_slot_bucket(largest), largest
    if largest > num_global_slots:
        row = int(per_row.argmax())
        raise ValueError(
            f"row {row} has {largest} global tokens but num_global_slots={num_global_slots}; "
            f"raise num_global_slots to at least {largest} (or leave it None outside jit)."
        )
    return num_global_slots, num_global_slots


def _already_prepared(inputs: ModelInputs, others: dict[str, Any], num_global_slots: int | None) -> ModelInputs:
    given = [name for name, value in others.items() if value is not None]
    if given:
        raise ValueError(
            f"input_ids is a ModelInputs (already prepared) but {', '.join(given)} was given too; pass the "
            "masks to prepare_inputs instead."
        )
    if num_global_slots is not None and num_global_slots != inputs.num_global_slots:
        raise ValueError(
            f"num_global_slots={num_global_slots} but the prepared inputs hold {inputs.num_global_slots} slots; "
            "pass num_global_slots to prepare_inputs instead."
        )
    return inputs


def prepare_inputs(
    config: LongformerConfig,
    input_ids=None,
    attention_mask=None,
    global_attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    *,
    num_global_slots: int | None = None,
) -> ModelInputs:
    """Check, merge, pad and count the inputs of ``LongformerModel`` (HF's arguments).

    Args:
        config: the model's config (windows, pad id, vocabulary and length limits).
        input_ids: (B, L) token ids; or None with ``inputs_embeds`` (B, L, E). A ``ModelInputs`` is
            returned as it is (the other inputs must then be None).
        attention_mask: (B, L), 1 keep and 0 pad; all ones when None.
        global_attention_mask: (B, L), 1 global; none global when None.
        token_type_ids: (B, L); zeros when None.
        position_ids: (B, L); RoBERTa positions from ``input_ids`` (or pad+1 .. L+pad) when None.
        inputs_embeds: (B, L, E) embeddings in place of ``input_ids``.
        num_global_slots: the static number of global tokens a row may hold; required when the
            masks are traced, chosen from them (rounded up to a power of two) when None.

    Returns:
        The padded arrays and the static slot count, input length and kept global columns.

    Raises:
        ValueError: for inputs of the wrong shape, token ids outside the vocabulary, rows longer
            than the position embeddings or with more global tokens than ``num_global_slots``.
    """
    inputs = dict(
        attention_mask=attention_mask,
        global_attention_mask=global_attention_mask,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
    )
    if isinstance(input_ids, ModelInputs):
        return _already_prepared(input_ids, dict(inputs, inputs_embeds=inputs_embeds), num_global_slots)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds.")
    shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:-1])
    check_inputs(config, shape, input_ids, inputs)
    B, L = shape
    if attention_mask is None:
        attention_mask = jnp.ones(shape, jnp.int32)
    if token_type_ids is None:
        token_type_ids = jnp.zeros(shape, jnp.int32)
    mask_BxL = jnp.asarray(attention_mask).astype(jnp.int32)
    if global_attention_mask is not None:
        mask_BxL = mask_BxL * (jnp.asarray(global_attention_mask).astype(jnp.int32) + 1)
    slots, columns = choose_global_slots(mask_BxL, num_global_slots)
    if position_ids is None:
        if input_ids is not None:
            position_ids = position_ids_from_input_ids(jnp.asarray(input_ids), config.pad_token_id)
        else:
            position_ids = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32) + config.pad_token_id + 1, shape)

    # Pad to a multiple of the largest window (HF's _pad_to_window_size), times the dilations if any.
    pad_len = (-L) % config.pad_multiple
    pad = lambda x, value=0: jnp.pad(jnp.asarray(x), ((0, 0), (0, pad_len)), constant_values=value)
    if input_ids is not None:
        input_ids = pad(input_ids, config.pad_token_id)
    else:
        pad_embeds = jnp.zeros((B, pad_len, inputs_embeds.shape[-1]), inputs_embeds.dtype)
        inputs_embeds = jnp.concatenate([jnp.asarray(inputs_embeds), pad_embeds], axis=1)
    return ModelInputs(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        mask=pad(mask_BxL),
        token_type_ids=pad(token_type_ids),
        position_ids=pad(position_ids, config.pad_token_id),
        num_global_slots=slots,
        length=L,
        global_columns=columns,
    )
