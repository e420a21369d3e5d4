"""The masked-LM head and the task heads, with HF's names, automatic global attention and losses.

HF heads: ``LongformerForMaskedLM``, ``...ForSequenceClassification``, ``...ForTokenClassification``,
``...ForQuestionAnswering``, ``...ForMultipleChoice`` (``../shared/SPEC.md``, Heads).
Heads of the seed checkpoint's own work (hierarchical sentence blocks of ``sentence_block_size``
tokens, each starting with ``<s>``/``</s>``): ``LongformerForDocumentClassification`` pools the
block-start tokens (max, attentive, first, last); ``LongformerForSequentialSentenceClassification``
predicts one label per block.

Every head is a :class:`LongformerTaskModel`: its ``__call__`` holds HF's signature and the encoder
call (``longformer``) once; a head says only what differs (its automatic global attention, what the
encoder sees, the head on top, the loss and the output dataclass).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax.config import LongformerConfig
from longformer_jax.dropout import Dropout
from longformer_jax.global_rules import (
    block_start_global_mask,
    choice_global_attention_mask,
    question_global_attention_mask,
)
from longformer_jax.inputs import ModelInputs, concrete
from longformer_jax.losses import IGNORE_INDEX, classification_loss, cross_entropy
from longformer_jax.modeling import LongformerBaseModelOutput, LongformerModel, activation, dense, layer_norm

Array = jax.Array


# ---------------------------------------------------------------------------------------- outputs
@flax.struct.dataclass
class _LogitsOutput:
    """The loss (when targets are given), the head's logits, then the encoder's per-layer outputs."""

    loss: Array | None = None
    logits: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    global_attentions: tuple[Array, ...] | None = None


@flax.struct.dataclass
class LongformerMaskedLMOutput(_LogitsOutput):
    """HF's ``LongformerMaskedLMOutput``: logits (B, L, vocab)."""


@flax.struct.dataclass
class LongformerSequenceClassifierOutput(_LogitsOutput):
    """HF's ``LongformerSequenceClassifierOutput`` (also the token-classification and multiple-choice output)."""


@flax.struct.dataclass
class LongformerQuestionAnsweringModelOutput:
    """HF's ``LongformerQuestionAnsweringModelOutput``: start and end logits (B, L)."""

    loss: Array | None = None
    start_logits: Array | None = None
    end_logits: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    global_attentions: tuple[Array, ...] | None = None


LongformerTokenClassifierOutput = LongformerSequenceClassifierOutput
LongformerMultipleChoiceModelOutput = LongformerSequenceClassifierOutput


# ---------------------------------------------------------------------------------------- masked LM
class LongformerLMHead(nn.Module):
    """dense -> gelu -> layer_norm -> decoder (tied to the word embeddings) + bias."""

    config: LongformerConfig

    @nn.compact
    def __call__(self, h, embedding_table=None):
        cfg = self.config
        x = dense(cfg, cfg.hidden_size, "dense")(h)
        x = activation("gelu")(x)
        x = layer_norm(cfg, "layer_norm")(x)
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
        if embedding_table is None:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=x.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(cfg.initializer_range),
                name="decoder",
            )(x)
        else:
            logits = jnp.einsum("...e,ve->...v", x, embedding_table.astype(x.dtype))
        return logits.astype(jnp.float32) + bias


class HeadInputs(NamedTuple):
    """The inputs of a task model, in HF's order (the encoder's positional arguments)."""

    input_ids: Any = None
    attention_mask: Any = None
    global_attention_mask: Any = None
    token_type_ids: Any = None
    position_ids: Any = None
    inputs_embeds: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the tokens: ``input_ids.shape`` or ``inputs_embeds.shape[:-1]``."""
        return tuple(self.input_ids.shape if self.input_ids is not None else self.inputs_embeds.shape[:-1])


class LongformerTaskModel(nn.Module):
    """The Longformer encoder (``longformer``) with a task head on top; the base of the ``LongformerFor...`` heads.

    ``__call__`` takes HF's arguments plus ``labels`` (the head's targets), ``deterministic``,
    ``output_attentions``, ``output_hidden_states`` and ``num_global_slots`` (as ``LongformerModel``).
    A head overrides what differs; the hooks run inside the compact ``__call__``, so the
    sub-modules they create get their names (``lm_head``, ``classifier``, ...) as if written there:

    - ``with_defaults(inputs)``: the inputs with the head's automatic global attention (and checks);
    - ``encoder_inputs(inputs)``: what the encoder sees (multiple choice flattens the choices);
    - ``head(out, inputs, deterministic)``: the output fields between ``loss`` and ``hidden_states``;
    - ``head_at(out, inputs, masked_positions, deterministic)``: the same fields at chosen positions only
      (``masked_positions`` (B, K), -1 = unused slot); only the masked-LM head has it;
    - ``loss(fields, labels, inputs)``: the loss, when labels are given.

    ``output_class`` is the output dataclass; ``add_pooling_layer`` whether the encoder has its pooler.
    """

    config: LongformerConfig

    add_pooling_layer = False
    output_class = LongformerSequenceClassifierOutput

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_global_slots: int | None = None,
        masked_positions=None,
    ):
        if isinstance(input_ids, ModelInputs):
            raise ValueError(
                f"{type(self).__name__} takes the raw inputs (input_ids, attention_mask, ...) and prepares them "
                "itself after adding its automatic global attention; a ModelInputs goes to LongformerModel. "
                "Under jit pass num_global_slots instead."
            )
        inputs = self.with_defaults(
            HeadInputs(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids, inputs_embeds)
        )
        out = LongformerModel(self.config, add_pooling_layer=self.add_pooling_layer, name="longformer")(
            *self.encoder_inputs(inputs),
            deterministic=deterministic,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            num_global_slots=num_global_slots,
        )
        if masked_positions is None:
            fields = self.head(out, inputs, deterministic)
        else:
            fields = self.head_at(out, inputs, masked_positions, deterministic)
        loss = self.loss(fields, labels, inputs) if labels is not None else None
        return self.output_class(loss, *fields, out.hidden_states, out.attentions, out.global_attentions)

    def with_defaults(self, inputs: HeadInputs) -> HeadInputs:
        return inputs

    def encoder_inputs(self, inputs: HeadInputs) -> HeadInputs:
        return inputs

    def head(self, out: LongformerBaseModelOutput, inputs: HeadInputs, deterministic: bool) -> tuple[Array, ...]:
        raise NotImplementedError

    def head_at(
        self, out: LongformerBaseModelOutput, inputs: HeadInputs, masked_positions, deterministic: bool
    ) -> tuple[Array, ...]:
        raise ValueError(
            f"{type(self).__name__} takes no masked_positions: only LongformerForMaskedLM computes its head at "
            "chosen positions; leave masked_positions out."
        )

    def loss(self, fields: tuple[Array, ...], labels, inputs: HeadInputs) -> Array:
        """HF's classification loss of the logits (regression, single- or multi-label)."""
        return classification_loss(self.config, fields[0], labels)


class LongformerForMaskedLM(LongformerTaskModel):
    """Masked-LM head; no automatic global attention. Loss: CE over labels != -100.

    With ``masked_positions`` (B, K) int32 (-1 = unused slot) the head runs only at those positions:
    ``logits`` are (B, K, vocab) and ``labels`` (B, K) hold one target per slot (-100 in unused slots),
    the layout ``train.masking.mask_tokens`` writes as ``masked_positions`` / ``masked_labels``. The
    loss equals the full-vocabulary loss at every position with the same labels, at K/L of the
    head's cost and without (B, L, vocab) logits. An unused slot's logits are those of position 0
    (meaningless; its label must be -100, and under ``jit`` a label there is ignored).
    """

    output_class = LongformerMaskedLMOutput

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        masked_positions=None,
        **kwargs,
    ) -> LongformerMaskedLMOutput:
        """``LongformerTaskModel.__call__`` with ``masked_positions`` (B, K): logits and loss at those slots."""
        inputs = (input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids, inputs_embeds)
        if masked_positions is not None:
            masked_positions, labels = _checked_slots(HeadInputs(*inputs).shape, masked_positions, labels)
        return super().__call__(*inputs, labels, masked_positions=masked_positions, **kwargs)

    def _lm_head(self, h):
        cfg = self.config
        table = None
        if cfg.tie_word_embeddings:
            table = self.variables["params"]["longformer"]["embeddings"]["word_embeddings"]["embedding"]
        return LongformerLMHead(cfg, name="lm_head")(h, table)

    def head(self, out, inputs, deterministic):
        return (self._lm_head(out.last_hidden_state),)

    def head_at(self, out, inputs, masked_positions, deterministic):
        index_BxK = jnp.maximum(masked_positions, 0)
        h_BxKxE = jnp.take_along_axis(out.last_hidden_state, index_BxK[..., None], axis=1)
        return (self._lm_head(h_BxKxE),)

    def loss(self, fields, labels, inputs):
        return cross_entropy(fields[0], labels)


def _checked_slots(shape, masked_positions, labels):
    """``masked_positions`` as int32 (B, K) checked against the input's (B, L) shape, and the labels of
    its slots (-100 forced in unused slots); errors name the fix (value checks only where concrete)."""
    positions = jnp.asarray(masked_positions)
    B, L = shape[0], shape[-1]
    if positions.ndim != 2 or positions.shape[0] != B or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(
            f"masked_positions of shape {tuple(positions.shape)} and dtype {positions.dtype} does not fit the "
            f"input of shape {tuple(shape)}: expected integers of shape ({B}, K), one row of K slots per sequence "
            "(-1 = unused slot)."
        )
    if labels is not None and tuple(jnp.shape(labels)) != tuple(positions.shape):
        raise ValueError(
            f"labels of shape {tuple(jnp.shape(labels))} with masked_positions of shape {tuple(positions.shape)}: "
            "with masked_positions the labels are one per slot, shape (B, K), -100 in unused slots "
            "(train.masking's masked_labels), not one per token."
        )
    p = concrete(positions)
    if p is not None and (p.min(initial=0) < -1 or p.max(initial=0) >= L):
        raise ValueError(
            f"masked_positions holds {int(p.min())}..{int(p.max())} but must lie in 0..{L - 1} (the input's "
            "positions) or be -1 for an unused slot."
        )
    if labels is None:
        return positions.astype(jnp.int32), None
    y = concrete(labels)
    if p is not None and y is not None and np.any((p < 0) & (y != IGNORE_INDEX)):
        raise ValueError("labels hold a target in an unused slot (masked_positions -1): set those labels to -100.")
    return positions.astype(jnp.int32), jnp.where(positions >= 0, jnp.asarray(labels), IGNORE_INDEX)


# ---------------------------------------------------------------------------------------- classification
class LongformerClassificationHead(nn.Module):
    """h -> dropout -> dense -> tanh -> dropout -> out_proj (HF's classification head)."""

    config: LongformerConfig
    num_labels: int

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg = self.config
        drop = Dropout(cfg.hidden_dropout_prob)
        x = drop(x, deterministic=deterministic)
        x = jnp.tanh(dense(cfg, cfg.hidden_size, "dense")(x))
        x = drop(x, deterministic=deterministic)
        return dense(cfg, self.num_labels, "out_proj")(x)


def classify(module: nn.Module, x: Array, deterministic: bool) -> Array:
    """``LongformerClassificationHead`` named ``classifier`` on ``x``, as float32 logits (from a hook)."""
    cfg = module.config
    return LongformerClassificationHead(cfg, cfg.num_labels, name="classifier")(x, deterministic).astype(jnp.float32)


class LongformerForSequenceClassification(LongformerTaskModel):
    """Global attention on position 0 when no global mask is given; classifier on ``<s>``."""

    def with_defaults(self, inputs):
        if inputs.global_attention_mask is not None:
            return inputs
        return inputs._replace(global_attention_mask=jnp.zeros(inputs.shape, jnp.int32).at[:, 0].set(1))

    def head(self, out, inputs, deterministic):
        return (classify(self, out.last_hidden_state[:, 0], deterministic),)


class LongformerForTokenClassification(LongformerTaskModel):
    """dropout -> classifier on every token; no automatic global attention."""

    output_class = LongformerTokenClassifierOutput

    def head(self, out, inputs, deterministic):
        cfg = self.config
        x = Dropout(cfg.hidden_dropout_prob)(out.last_hidden_state, deterministic=deterministic)
        return (dense(cfg, cfg.num_labels, "classifier")(x).astype(jnp.float32),)

    def loss(self, fields, labels, inputs):
        return cross_entropy(fields[0].reshape(-1, self.config.num_labels), labels.reshape(-1))


# ---------------------------------------------------------------------------------------- QA / multiple choice
class LongformerForQuestionAnswering(LongformerTaskModel):
    """Global attention on the question when no mask is given; start/end logits; loss (CE_s + CE_e)/2.

    The targets are ``start_positions`` and ``end_positions`` (HF's names) in place of ``labels``."""

    output_class = LongformerQuestionAnsweringModelOutput

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        **kwargs,
    ) -> LongformerQuestionAnsweringModelOutput:
        """``LongformerTaskModel.__call__`` with the targets ``start_positions`` and ``end_positions``."""
        labels = None if start_positions is None or end_positions is None else (start_positions, end_positions)
        inputs = (input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids, inputs_embeds)
        return super().__call__(*inputs, labels, **kwargs)

    def with_defaults(self, inputs):
        if inputs.global_attention_mask is not None or inputs.input_ids is None:
            return inputs
        return inputs._replace(
            global_attention_mask=question_global_attention_mask(inputs.input_ids, self.config.sep_token_id)
        )

    def head(self, out, inputs, deterministic):
        logits = dense(self.config, 2, "qa_outputs")(out.last_hidden_state).astype(jnp.float32)
        return logits[..., 0], logits[..., 1]

    def loss(self, fields, labels, inputs):
        (start_logits, end_logits), (start_positions, end_positions) = fields, labels
        length = start_logits.shape[1]
        s = jnp.clip(jnp.asarray(start_positions).reshape(-1), 0, length)
        e = jnp.clip(jnp.asarray(end_positions).reshape(-1), 0, length)
        return (cross_entropy(start_logits, s, length) + cross_entropy(end_logits, e, length)) / 2


class LongformerForMultipleChoice(LongformerTaskModel):
    """Inputs (B, choices, L), flattened; pooler -> dropout -> classifier -> (B, choices) logits."""

    add_pooling_layer = True
    output_class = LongformerMultipleChoiceModelOutput

    def with_defaults(self, inputs):
        x = inputs.input_ids if inputs.input_ids is not None else inputs.inputs_embeds
        want = 3 if inputs.input_ids is not None else 4
        if x is None or x.ndim != want:
            raise ValueError(
                f"multiple choice expects {'input_ids' if want == 3 else 'inputs_embeds'} of rank {want} "
                f"(batch, num_choices, sequence_length{', hidden' if want == 4 else ''}), got shape "
                f"{None if x is None else tuple(x.shape)}; stack the choices on axis 1."
            )
        if inputs.global_attention_mask is not None or inputs.input_ids is None:
            return inputs
        B, C, L = x.shape[:3]
        gm = choice_global_attention_mask(jnp.asarray(inputs.input_ids).reshape(B * C, L), self.config.sep_token_id)
        return inputs._replace(global_attention_mask=gm)

    def encoder_inputs(self, inputs):
        B, C, L = inputs.shape[:3]

        def flat(a):
            if a is None:
                return None
            a = jnp.asarray(a)
            if a.shape[:2] != (B, C):
                raise ValueError(f"an input of shape {tuple(a.shape)} does not match input_ids {(B, C, L)}.")
            return a.reshape((B * C,) + a.shape[2:])

        gm = inputs.global_attention_mask
        gm = jnp.asarray(gm).reshape(B * C, L) if gm is not None else None
        return HeadInputs(*(flat(a) for a in inputs._replace(global_attention_mask=None)))._replace(
            global_attention_mask=gm
        )

    def head(self, out, inputs, deterministic):
        pooled = Dropout(self.config.hidden_dropout_prob)(out.pooler_output, deterministic=deterministic)
        return (dense(self.config, 1, "classifier")(pooled).astype(jnp.float32).reshape(inputs.shape[:2]),)

    def loss(self, fields, labels, inputs):
        return cross_entropy(fields[0], jnp.asarray(labels))


# ---------------------------------------------------------------------------------------- sentence blocks
def _with_block_defaults(inputs: HeadInputs, block_size: int) -> HeadInputs:
    """An attention mask of ones when none is given; global attention on the block starts by default."""
    am = jnp.ones(inputs.shape, jnp.int32) if inputs.attention_mask is None else jnp.asarray(inputs.attention_mask)
    gm = inputs.global_attention_mask
    if gm is None:
        gm = block_start_global_mask(am, block_size)
    return inputs._replace(attention_mask=am, global_attention_mask=gm)


def _block_starts(h_BxLxE, attention_mask_BxL, block_size):
    B, L, E = h_BxLxE.shape
    if L % block_size:
        raise ValueError(
            f"sequence length {L} is not a multiple of sentence_block_size={block_size}; pad each document to "
            "whole blocks (train.data's sentence-block layout does)."
        )
    return h_BxLxE[:, ::block_size], _nonempty_blocks(attention_mask_BxL, block_size)


def _nonempty_blocks(attention_mask_BxL, block_size):
    """(B, N) bool: the block's start token is not padding."""
    return attention_mask_BxL[:, ::block_size] != 0


class LongformerForDocumentClassification(LongformerTaskModel):
    """Document classification pooling the block-start tokens (max, attentive, first, last).

    The input is laid out in sentence blocks of ``sentence_block_size`` tokens, each starting with
    ``<s>``/``</s>`` (the seed checkpoint's pretraining layout); a block whose start token is
    padding is empty. Global attention defaults to every block start. Parameters: ``longformer``,
    ``pooler`` (attentive pooling only) and ``classifier`` (HF's classification head).
    """

    pooling: str = "max"
    sentence_block_size: int = 128

    def with_defaults(self, inputs):
        if self.pooling not in ("max", "attentive", "first", "last"):
            raise ValueError(f"pooling={self.pooling!r}; expected 'max', 'attentive', 'first' or 'last'.")
        return _with_block_defaults(inputs, self.sentence_block_size)

    def head(self, out, inputs, deterministic):
        starts, valid = _block_starts(out.last_hidden_state, inputs.attention_mask, self.sentence_block_size)
        if self.pooling == "max":
            pooled = jnp.max(jnp.where(valid[..., None], starts, -jnp.inf), axis=1)
        elif self.pooling == "first":
            pooled = starts[:, 0]
        elif self.pooling == "last":
            last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
            pooled = jnp.take_along_axis(starts, last[:, None, None], axis=1)[:, 0]
        else:
            cfg = self.config
            score = dense(cfg, 1, "attention")(jnp.tanh(dense(cfg, cfg.hidden_size, "dense")(starts)))[..., 0]
            score = jnp.where(valid, score.astype(jnp.float32), -jnp.inf)
            weights = jax.nn.softmax(score, axis=1)
            pooled = jnp.einsum("bn,bne->be", weights.astype(starts.dtype), starts)
        return (classify(self, pooled, deterministic),)


class LongformerForSequentialSentenceClassification(LongformerTaskModel):
    """One prediction per sentence block: logits (B, L // sentence_block_size, num_labels).

    Labels (B, num_blocks) with -100 for empty blocks. Global attention defaults to block starts.
    """

    sentence_block_size: int = 128
    output_class = LongformerTokenClassifierOutput

    def with_defaults(self, inputs):
        return _with_block_defaults(inputs, self.sentence_block_size)

    def head(self, out, inputs, deterministic):
        starts, _ = _block_starts(out.last_hidden_state, inputs.attention_mask, self.sentence_block_size)
        return (classify(self, starts, deterministic),)

    def loss(self, fields, labels, inputs):
        valid = _nonempty_blocks(inputs.attention_mask, self.sentence_block_size)
        return cross_entropy(fields[0], jnp.where(valid, jnp.asarray(labels), IGNORE_INDEX))
