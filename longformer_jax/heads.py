"""The masked-LM head and the task heads, with HF's names, automatic global attention and losses.

HF heads: ``LongformerForMaskedLM``, ``...ForSequenceClassification``, ``...ForTokenClassification``,
``...ForQuestionAnswering``, ``...ForMultipleChoice`` (``../shared/SPEC.md``, Heads).
Heads of the seed checkpoint's own work (hierarchical sentence blocks of ``sentence_block_size``
tokens, each starting with ``<s>``/``</s>``): ``LongformerForDocumentClassification`` pools the
block-start tokens (max, attentive, first, last); ``LongformerForSequentialSentenceClassification``
predicts one label per block.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax.config import LongformerConfig
from longformer_jax.dropout import Dropout
from longformer_jax.losses import IGNORE_INDEX, classification_loss, cross_entropy
from longformer_jax.modeling import (
    LongformerModel,
    activation,
    concrete,
    dense,
    layer_norm,
)

Array = jax.Array


# ---------------------------------------------------------------------------------------- outputs
@flax.struct.dataclass
class LongformerMaskedLMOutput:
    loss: Array | None = None
    logits: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    global_attentions: tuple[Array, ...] | None = None


@flax.struct.dataclass
class LongformerSequenceClassifierOutput:
    loss: Array | None = None
    logits: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    global_attentions: tuple[Array, ...] | None = None


LongformerTokenClassifierOutput = LongformerSequenceClassifierOutput
LongformerMultipleChoiceModelOutput = LongformerSequenceClassifierOutput


@flax.struct.dataclass
class LongformerQuestionAnsweringModelOutput:
    loss: Array | None = None
    start_logits: Array | None = None
    end_logits: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    global_attentions: tuple[Array, ...] | None = None


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


def _model_kwargs(kw):
    return {k: kw[k] for k in ("deterministic", "output_attentions", "output_hidden_states", "num_global_slots")}


class LongformerForMaskedLM(nn.Module):
    """Masked-LM head; no automatic global attention. Loss: CE over labels != -100."""

    config: LongformerConfig

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
    ) -> LongformerMaskedLMOutput:
        cfg = self.config
        out = LongformerModel(cfg, add_pooling_layer=False, name="longformer")(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            **_model_kwargs(locals()),
        )
        table = None
        if cfg.tie_word_embeddings:
            table = self.variables["params"]["longformer"]["embeddings"]["word_embeddings"]["embedding"]
        logits = LongformerLMHead(cfg, name="lm_head")(out.last_hidden_state, table)
        loss = cross_entropy(logits, labels) if labels is not None else None
        return LongformerMaskedLMOutput(loss, logits, out.hidden_states, out.attentions, out.global_attentions)


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


class LongformerForSequenceClassification(nn.Module):
    """Global attention on position 0 when no global mask is given; classifier on ``<s>``."""

    config: LongformerConfig

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
    ) -> LongformerSequenceClassifierOutput:
        cfg = self.config
        if global_attention_mask is None:
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
            global_attention_mask = jnp.zeros(shape, jnp.int32).at[:, 0].set(1)
        out = LongformerModel(cfg, add_pooling_layer=False, name="longformer")(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            **_model_kwargs(locals()),
        )
        logits = LongformerClassificationHead(cfg, cfg.num_labels, name="classifier")(
            out.last_hidden_state[:, 0], deterministic
        ).astype(jnp.float32)
        loss = classification_loss(cfg, logits, labels) if labels is not None else None
        return LongformerSequenceClassifierOutput(
            loss, logits, out.hidden_states, out.attentions, out.global_attentions
        )


class LongformerForTokenClassification(nn.Module):
    """dropout -> classifier on every token; no automatic global attention."""

    config: LongformerConfig

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
    ) -> LongformerTokenClassifierOutput:
        cfg = self.config
        out = LongformerModel(cfg, add_pooling_layer=False, name="longformer")(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            **_model_kwargs(locals()),
        )
        x = Dropout(cfg.hidden_dropout_prob)(out.last_hidden_state, deterministic=deterministic)
        logits = dense(cfg, cfg.num_labels, "classifier")(x).astype(jnp.float32)
        loss = cross_entropy(logits.reshape(-1, cfg.num_labels), labels.reshape(-1)) if labels is not None else None
        return LongformerTokenClassifierOutput(loss, logits, out.hidden_states, out.attentions, out.global_attentions)


# ---------------------------------------------------------------------------------------- QA / multiple choice
def _first_separator(input_ids, sep_token_id: int, what: str):
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


def question_global_attention_mask(input_ids, sep_token_id: int) -> Array:
    """Global attention on every token before the first separator (the question and ``<s>``)."""
    end = _first_separator(input_ids, sep_token_id, "question answering")
    return (jnp.arange(input_ids.shape[-1])[None, :] < end[:, None]).astype(jnp.int32)


def choice_global_attention_mask(input_ids, sep_token_id: int) -> Array:
    """Global attention on every token after the first ``</s></s>`` (HF's multiple-choice rule)."""
    end = _first_separator(input_ids, sep_token_id, "multiple choice")
    return (jnp.arange(input_ids.shape[-1])[None, :] > end[:, None] + 1).astype(jnp.int32)


class LongformerForQuestionAnswering(nn.Module):
    """Global attention on the question when no mask is given; start/end logits; loss (CE_s + CE_e)/2."""

    config: LongformerConfig

    @nn.compact
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
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_global_slots: int | None = None,
    ) -> LongformerQuestionAnsweringModelOutput:
        cfg = self.config
        if global_attention_mask is None and input_ids is not None:
            global_attention_mask = question_global_attention_mask(input_ids, cfg.sep_token_id)
        out = LongformerModel(cfg, add_pooling_layer=False, name="longformer")(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            **_model_kwargs(locals()),
        )
        logits = dense(cfg, 2, "qa_outputs")(out.last_hidden_state).astype(jnp.float32)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            length = start_logits.shape[1]
            s = jnp.clip(jnp.asarray(start_positions).reshape(-1), 0, length)
            e = jnp.clip(jnp.asarray(end_positions).reshape(-1), 0, length)
            loss = (cross_entropy(start_logits, s, length) + cross_entropy(end_logits, e, length)) / 2
        return LongformerQuestionAnsweringModelOutput(
            loss, start_logits, end_logits, out.hidden_states, out.attentions, out.global_attentions
        )


class LongformerForMultipleChoice(nn.Module):
    """Inputs (B, choices, L), flattened; pooler -> dropout -> classifier -> (B, choices) logits."""

    config: LongformerConfig

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
    ) -> LongformerMultipleChoiceModelOutput:
        cfg = self.config
        x = input_ids if input_ids is not None else inputs_embeds
        want = 3 if input_ids is not None else 4
        if x is None or x.ndim != want:
            raise ValueError(
                f"multiple choice expects {'input_ids' if input_ids is not None else 'inputs_embeds'} of rank {want} "
                f"(batch, num_choices, sequence_length{', hidden' if want == 4 else ''}), got shape "
                f"{None if x is None else tuple(x.shape)}; stack the choices on axis 1."
            )
        B, C, L = x.shape[:3]
        if global_attention_mask is None and input_ids is not None:
            global_attention_mask = choice_global_attention_mask(
                jnp.asarray(input_ids).reshape(B * C, L), cfg.sep_token_id
            )

        def flat(a, trailing=0):
            if a is None:
                return None
            a = jnp.asarray(a)
            if a.shape[:2] != (B, C):
                raise ValueError(f"an input of shape {tuple(a.shape)} does not match input_ids {(B, C, L)}.")
            return a.reshape((B * C,) + a.shape[2:])

        gm = jnp.asarray(global_attention_mask).reshape(B * C, L) if global_attention_mask is not None else None
        out = LongformerModel(cfg, add_pooling_layer=True, name="longformer")(
            flat(input_ids),
            flat(attention_mask),
            gm,
            flat(token_type_ids),
            flat(position_ids),
            flat(inputs_embeds),
            **_model_kwargs(locals()),
        )
        pooled = Dropout(cfg.hidden_dropout_prob)(out.pooler_output, deterministic=deterministic)
        logits = dense(cfg, 1, "classifier")(pooled).astype(jnp.float32).reshape(B, C)
        loss = cross_entropy(logits, jnp.asarray(labels)) if labels is not None else None
        return LongformerMultipleChoiceModelOutput(
            loss, logits, out.hidden_states, out.attentions, out.global_attentions
        )


# ---------------------------------------------------------------------------------------- sentence blocks
def block_start_global_mask(attention_mask_BxL: Array, block_size: int) -> Array:
    """Global attention on the first token of every non-empty block of ``block_size`` tokens."""
    B, L = attention_mask_BxL.shape
    starts = (jnp.arange(L) % block_size == 0)[None, :]
    return (starts & (attention_mask_BxL != 0)).astype(jnp.int32)


def _block_starts(h_BxLxE, attention_mask_BxL, block_size):
    B, L, E = h_BxLxE.shape
    if L % block_size:
        raise ValueError(
            f"sequence length {L} is not a multiple of sentence_block_size={block_size}; pad each document to "
            "whole blocks (train.data's sentence-block layout does)."
        )
    starts_BxNxE = h_BxLxE[:, ::block_size]
    valid_BxN = attention_mask_BxL[:, ::block_size] != 0
    return starts_BxNxE, valid_BxN


class LongformerForDocumentClassification(nn.Module):
    """Document classification pooling the block-start tokens (max, attentive, first, last).

    The input is laid out in sentence blocks of ``sentence_block_size`` tokens, each starting with
    ``<s>``/``</s>`` (the seed checkpoint's pretraining layout); a block whose start token is
    padding is empty. Global attention defaults to every block start. Parameters: ``longformer``,
    ``pooler`` (attentive pooling only) and ``classifier`` (HF's classification head).
    """

    config: LongformerConfig
    pooling: str = "max"
    sentence_block_size: int = 128

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
    ) -> LongformerSequenceClassifierOutput:
        cfg = self.config
        if self.pooling not in ("max", "attentive", "first", "last"):
            raise ValueError(f"pooling={self.pooling!r}; expected 'max', 'attentive', 'first' or 'last'.")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        am = jnp.ones(shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        if global_attention_mask is None:
            global_attention_mask = block_start_global_mask(am, self.sentence_block_size)
        out = LongformerModel(cfg, add_pooling_layer=False, name="longformer")(
            input_ids,
            am,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            **_model_kwargs(locals()),
        )
        starts, valid = _block_starts(out.last_hidden_state, am, self.sentence_block_size)
        if self.pooling == "max":
            pooled = jnp.max(jnp.where(valid[..., None], starts, -jnp.inf), axis=1)
        elif self.pooling == "first":
            pooled = starts[:, 0]
        elif self.pooling == "last":
            last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
            pooled = jnp.take_along_axis(starts, last[:, None, None], axis=1)[:, 0]
        else:
            score = dense(cfg, 1, "attention")(jnp.tanh(dense(cfg, cfg.hidden_size, "dense")(starts)))[..., 0]
            score = jnp.where(valid, score.astype(jnp.float32), -jnp.inf)
            weights = jax.nn.softmax(score, axis=1)
            pooled = jnp.einsum("bn,bne->be", weights.astype(starts.dtype), starts)
        logits = LongformerClassificationHead(cfg, cfg.num_labels, name="classifier")(pooled, deterministic)
        logits = logits.astype(jnp.float32)
        loss = classification_loss(cfg, logits, labels) if labels is not None else None
        return LongformerSequenceClassifierOutput(
            loss, logits, out.hidden_states, out.attentions, out.global_attentions
        )


class LongformerForSequentialSentenceClassification(nn.Module):
    """One prediction per sentence block: logits (B, L // sentence_block_size, num_labels).

    Labels (B, num_blocks) with -100 for empty blocks. Global attention defaults to block starts.
    """

    config: LongformerConfig
    sentence_block_size: int = 128

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
    ) -> LongformerTokenClassifierOutput:
        cfg = self.config
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        am = jnp.ones(shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        if global_attention_mask is None:
            global_attention_mask = block_start_global_mask(am, self.sentence_block_size)
        out = LongformerModel(cfg, add_pooling_layer=False, name="longformer")(
            input_ids,
            am,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            **_model_kwargs(locals()),
        )
        starts, valid = _block_starts(out.last_hidden_state, am, self.sentence_block_size)
        logits = LongformerClassificationHead(cfg, cfg.num_labels, name="classifier")(starts, deterministic)
        logits = logits.astype(jnp.float32)
        loss = None
        if labels is not None:
            labels = jnp.where(valid, jnp.asarray(labels), IGNORE_INDEX)
            loss = cross_entropy(logits, labels)
        return LongformerTokenClassifierOutput(loss, logits, out.hidden_states, out.attentions, out.global_attentions)

