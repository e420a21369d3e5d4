"""Flax Linen modules of the Longformer encoder: embeddings, layer, encoder, LongformerModel.

Module and parameter names are the Hugging Face state-dict names (``longformer_jax.state_dict`` maps them
one to one). The attention math lives in :mod:`longformer_jax.attention`; modules only hold the
parameters and call it.

Static shapes: the input is padded to a multiple of the largest window, and the number of global
slots ``G`` is a static int. Eagerly (concrete masks) ``G`` is chosen from the masks, rounded up to
a bucket (0, 1, 2, 4, 8, ...), and the outputs are cut back to HF's exact layout. Under ``jit``
pass ``num_global_slots`` yourself; a row with more global tokens than slots then yields NaN
(never silently wrong numbers), and eagerly it is a ValueError.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax import attention as attn
from longformer_jax.config import LongformerConfig
from longformer_jax.dropout import Dropout

Array = jax.Array

_ACT = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    return _ACT[name]


def compute_dtype(config: LongformerConfig):
    return jnp.dtype(config.dtype)


def dense(config: LongformerConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=compute_dtype(config),
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


def layer_norm(config: LongformerConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=compute_dtype(config), param_dtype=jnp.float32, name=name)


# ---------------------------------------------------------------------------------------- outputs
@flax.struct.dataclass
class LongformerBaseModelOutput:
    last_hidden_state: Array
    pooler_output: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    global_attentions: tuple[Array, ...] | None = None


# ---------------------------------------------------------------------------------------- helpers
def concrete(x) -> np.ndarray | None:
    """``x`` as a numpy array when its value is known (not traced by jit), else None."""
    if x is None:
        return None
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def global_slot_bucket(n: int) -> int:
    """Round a number of global tokens up to a bucket: 0, 1, 2, 4, 8, 16, ..."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


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
    if length > config.max_sequence_length:
        # Pads take no position, so a longer row is fine when its real tokens fit (as in HF).
        ids = concrete(input_ids)
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
    ids = concrete(input_ids)
    if ids is not None and ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = hi if hi >= config.vocab_size else lo
            raise ValueError(
                f"input_ids holds token id {bad}, outside the vocabulary [0, {config.vocab_size}); "
                "was the text tokenized with this model's tokenizer?"
            )


# ---------------------------------------------------------------------------------------- modules
class LongformerEmbeddings(nn.Module):
    config: LongformerConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds=None, deterministic=True):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, name="position_embeddings")
        tok = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="token_type_embeddings")
        if inputs_embeds is None:
            inputs_embeds = word(input_ids)
        else:
            word(jnp.zeros((1, 1), jnp.int32))  # create the table when built from inputs_embeds
        x = inputs_embeds.astype(jnp.float32) + pos(position_ids) + tok(token_type_ids)
        x = layer_norm(cfg, "LayerNorm")(x)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class LongformerSelfAttention(nn.Module):
    config: LongformerConfig
    attention_window: int
    deterministic: bool = True
    output_attentions: bool = False

    @nn.compact
    def __call__(self, h_BxLxE, mask_BxL, slots: attn.GlobalSlots):
        cfg = self.config
        B, L, _ = h_BxLxE.shape
        H, D = cfg.num_attention_heads, cfg.head_dim
        scale = jnp.asarray(1.0 / np.sqrt(D), compute_dtype(cfg))

        def heads(x_BxTxE):  # (B, T, H*D) -> head-major (B, H, T, D)
            return x_BxTxE.reshape(x_BxTxE.shape[0], x_BxTxE.shape[1], H, D).transpose(0, 2, 1, 3)

        q = heads(dense(cfg, cfg.hidden_size, "query")(h_BxLxE)) * scale
        k = heads(dense(cfg, cfg.hidden_size, "key")(h_BxLxE))
        v = heads(dense(cfg, cfg.hidden_size, "value")(h_BxLxE))
        rate = cfg.attention_probs_dropout_prob
        use_dropout = not self.deterministic and rate > 0.0
        rng_local = self.make_rng("dropout") if use_dropout else None
        band_kw = dict(
            block_size=cfg.attention_block_size, dropout_rate=rate if use_dropout else 0.0, dropout_rng=rng_local
        )
        if self.output_attentions:
            out_BxHxLxD, probs = attn.sliding_window_attention_heads(
                q, k, v, mask_BxL, self.attention_window // 2, slots, return_probs=True, **band_kw
            )
        else:
            # Chunked band with a recomputing backward pass: the same numbers in O(L * D) memory.
            out_BxHxLxD = attn.lean_band_attention_heads(
                q, k, v, mask_BxL, self.attention_window // 2, slots, **band_kw
            )
            probs = None
        G = slots.index_BxG.shape[1]
        global_probs = None
        # The global projections always exist (HF state dicts carry them); they are only used when G > 0.
        E = cfg.hidden_size
        q_glob = dense(cfg, E, "query_global")
        wk, bk = DenseParams(cfg, E, name="key_global")(E)
        wv, bv = DenseParams(cfg, E, name="value_global")(E)
        if G == 0:
            if self.is_initializing():
                q_glob(h_BxLxE[:, :1])
        else:
            h_BxGxE = jnp.take_along_axis(h_BxLxE, slots.index_BxG[:, :, None], axis=1)
            qg = heads(q_glob(h_BxGxE)) * scale
            rng_global = self.make_rng("dropout") if use_dropout else None
            drop = dict(dropout_rate=rate if use_dropout else 0.0, dropout_rng=rng_global)
            x = h_BxLxE.astype(compute_dtype(cfg))
            if attn.reassociate_global(G, H, E):
                # A few global queries: fold the key/value projections into them (no L x E keys).
                out_g, global_probs = attn.global_query_attention_from_hidden_heads(
                    qg, x, wk, bk, wv, bv, mask_BxL, slots, **drop
                )
            else:
                project = lambda w, b: heads(x @ w.astype(x.dtype) + b.astype(x.dtype))
                out_g, global_probs = attn.global_query_attention_heads(
                    qg, project(wk, bk), project(wv, bv), mask_BxL, slots, **drop
                )
            out_BxHxLxD = attn.scatter_global_rows_heads(out_BxHxLxD, out_g, slots)
            if probs is not None:
                # HF zeroes the local rows of global queries; their probabilities are the global ones.
                probs = jnp.where((mask_BxL == 2)[:, None, :, None], 0.0, probs)
        return out_BxHxLxD.transpose(0, 2, 1, 3).reshape(B, L, H * D), probs, global_probs


class DenseParams(nn.Module):
    """The parameters of ``dense(config, features, name)`` (same names, shapes, initialisers), unapplied.

    For projections that the attention folds into other products instead of applying them."""

    config: LongformerConfig
    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        init = nn.initializers.normal(self.config.initializer_range)
        kernel = self.param("kernel", init, (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


def activation_then_dense(name: str, x: Array, kernel: Array, bias: Array) -> Array:
    """``act(x) @ kernel + bias``, with ``act(x)`` recomputed in the backward pass instead of kept.

    The feed-forward's (L x 3072) activation output would otherwise stay alive from the forward to
    the backward pass next to its input; recomputing it costs one elementwise pass."""

    def f(x, kernel, bias):
        y = activation(name)(x)
        return jnp.dot(y, kernel.astype(y.dtype)) + bias.astype(y.dtype)

    return jax.checkpoint(f)(x, kernel, bias)


class LongformerDenseOutput(nn.Module):
    """``dense -> dropout -> LayerNorm(x + residual)``: HF's SelfOutput and Output.

    With ``activation`` set, ``x`` is the intermediate layer's pre-activation and the activation is
    applied here (see :func:`activation_then_dense`); the parameters are the same."""

    config: LongformerConfig
    deterministic: bool = True
    activation: str | None = None

    @nn.compact
    def __call__(self, x, residual):
        cfg = self.config
        if self.activation is None:
            x = dense(cfg, cfg.hidden_size, "dense")(x)
        else:
            kernel, bias = DenseParams(cfg, cfg.hidden_size, name="dense")(x.shape[-1])
            x = activation_then_dense(self.activation, x.astype(compute_dtype(cfg)), kernel, bias)
        x = Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)
        return layer_norm(cfg, "LayerNorm")(x + residual)


class LongformerAttention(nn.Module):
    config: LongformerConfig
    attention_window: int
    deterministic: bool = True
    output_attentions: bool = False

    @nn.compact
    def __call__(self, h, mask_BxL, slots):
        a, probs, global_probs = LongformerSelfAttention(
            self.config, self.attention_window, self.deterministic, self.output_attentions, name="self"
        )(h, mask_BxL, slots)
        a = LongformerDenseOutput(self.config, self.deterministic, name="output")(a, h)
        return a, probs, global_probs


class LongformerIntermediate(nn.Module):
    """``act(dense(x))``; with ``apply_activation=False`` the pre-activation (the layer applies it later)."""

    config: LongformerConfig
    apply_activation: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        z = dense(cfg, cfg.intermediate_size, "dense")(x)
        return activation(cfg.hidden_act)(z) if self.apply_activation else z


class LongformerLayer(nn.Module):
    """One post-LN layer; returns the new hidden states and the layer's attention probabilities."""

    config: LongformerConfig
    attention_window: int
    deterministic: bool = True
    output_attentions: bool = False

    @nn.compact
    def __call__(self, h, mask_BxL, slots):
        cfg = self.config
        a, probs, global_probs = LongformerAttention(
            cfg, self.attention_window, self.deterministic, self.output_attentions, name="attention"
        )(h, mask_BxL, slots)
        z = LongformerIntermediate(cfg, apply_activation=False, name="intermediate")(a)
        out = LongformerDenseOutput(cfg, self.deterministic, activation=cfg.hidden_act, name="output")(z, a)
        return out, probs, global_probs


def remat_layer(config: LongformerConfig):
    """``LongformerLayer``, rematerialised in the backward pass when ``config.remat`` is set."""
    return nn.remat(LongformerLayer) if config.remat else LongformerLayer


class _ScanLayer(nn.Module):
    """``LongformerLayer`` in the (carry, inputs) -> (carry, outputs) form of ``nn.scan``."""

    config: LongformerConfig
    attention_window: int
    deterministic: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False

    @nn.compact
    def __call__(self, h, mask_BxL, slots):
        layer_cls = remat_layer(self.config)
        out, probs, global_probs = layer_cls(
            self.config, self.attention_window, self.deterministic, self.output_attentions, name="layer"
        )(h, mask_BxL, slots)
        return out, (h if self.output_hidden_states else None, probs, global_probs)


class LongformerEncoder(nn.Module):
    config: LongformerConfig
    deterministic: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False

    @nn.compact
    def __call__(self, h, mask_BxL, slots):
        cfg = self.config
        windows = cfg.attention_windows
        if cfg.scan_layers:
            scanned = nn.scan(
                _ScanLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
            )
            # Parameters live under encoder/layer/... with a leading layer axis.
            h_out, (hs, probs, gprobs) = scanned(
                cfg, windows[0], self.deterministic, self.output_attentions, self.output_hidden_states,
                name="layer",
            )(h, mask_BxL, slots)
            hidden_states = (
                tuple(hs[i] for i in range(cfg.num_hidden_layers)) + (h_out,) if self.output_hidden_states else None
            )
            attentions = tuple(probs[i] for i in range(cfg.num_hidden_layers)) if self.output_attentions else None
            global_attentions = (
                tuple(gprobs[i] for i in range(cfg.num_hidden_layers))
                if self.output_attentions and gprobs is not None
                else None
            )
            return h_out, hidden_states, attentions, global_attentions

        layer_cls = remat_layer(cfg)
        hidden_states, attentions, global_attentions = [], [], []
        for i in range(cfg.num_hidden_layers):
            hidden_states.append(h)
            h, probs, gprobs = layer_cls(
                cfg, windows[i], self.deterministic, self.output_attentions, name=f"layer_{i}"
            )(h, mask_BxL, slots)
            attentions.append(probs)
            global_attentions.append(gprobs)
        hidden_states.append(h)
        return (
            h,
            tuple(hidden_states) if self.output_hidden_states else None,
            tuple(attentions) if self.output_attentions else None,
            tuple(global_attentions) if self.output_attentions and global_attentions[0] is not None else None,
        )


class LongformerPooler(nn.Module):
    config: LongformerConfig

    @nn.compact
    def __call__(self, h_BxLxE):
        return jnp.tanh(dense(self.config, self.config.hidden_size, "dense")(h_BxLxE[:, 0]))


class LongformerModel(nn.Module):
    """The Longformer encoder (HF ``LongformerModel``), with or without the pooler.

    ``__call__`` takes HF's arguments (``input_ids`` or ``inputs_embeds``, ``attention_mask``,
    ``global_attention_mask``, ``token_type_ids``, ``position_ids``) plus ``deterministic``
    (False turns dropout on; pass ``rngs={"dropout": key}``) and ``num_global_slots`` (static
    number of global tokens a row may hold; required under jit, chosen from the masks otherwise).
    """

    config: LongformerConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_global_slots: int | None = None,
    ) -> LongformerBaseModelOutput:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds.")
        shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:-1])
        check_inputs(
            cfg,
            shape,
            input_ids,
            {
                "attention_mask": attention_mask,
                "global_attention_mask": global_attention_mask,
                "token_type_ids": token_type_ids,
                "position_ids": position_ids,
            },
        )
        B, L = shape
        if attention_mask is None:
            attention_mask = jnp.ones(shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        mask_BxL = jnp.asarray(attention_mask).astype(jnp.int32)
        if global_attention_mask is not None:
            mask_BxL = mask_BxL * (jnp.asarray(global_attention_mask).astype(jnp.int32) + 1)

        # Static number of global slots.
        counts = concrete(mask_BxL)
        auto_slots = num_global_slots is None
        if counts is not None:
            per_row = (counts == 2).sum(-1)
            largest = int(per_row.max()) if per_row.size else 0
            if auto_slots:
                num_global_slots = global_slot_bucket(largest)
            elif largest > num_global_slots:
                row = int(per_row.argmax())
                raise ValueError(
                    f"row {row} has {largest} global tokens but num_global_slots={num_global_slots}; "
                    f"raise num_global_slots to at least {largest} (or leave it None outside jit)."
                )
        elif auto_slots:
            raise ValueError(
                "num_global_slots must be given when the masks are traced (under jit/pmap/grad of the "
                "inputs): pass num_global_slots=<the largest number of global tokens a row may hold>, "
                "or 0 for none."
            )
        else:
            largest = None

        # Pad to a multiple of the largest window (HF's _pad_to_window_size).
        window = cfg.max_window
        pad_len = (-L) % window
        if position_ids is None:
            if input_ids is not None:
                position_ids = position_ids_from_input_ids(jnp.asarray(input_ids), cfg.pad_token_id)
            else:
                position_ids = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32) + cfg.pad_token_id + 1, shape)
        if pad_len:
            padw = ((0, 0), (0, pad_len))
            if input_ids is not None:
                input_ids = jnp.pad(jnp.asarray(input_ids), padw, constant_values=cfg.pad_token_id)
            else:
                pad_embeds = jnp.zeros((B, pad_len, inputs_embeds.shape[-1]), inputs_embeds.dtype)
                inputs_embeds = jnp.concatenate([jnp.asarray(inputs_embeds), pad_embeds], axis=1)
            position_ids = jnp.pad(jnp.asarray(position_ids), padw, constant_values=cfg.pad_token_id)
            token_type_ids = jnp.pad(jnp.asarray(token_type_ids), padw)
            mask_BxL = jnp.pad(mask_BxL, padw)

        slots = attn.global_slots(mask_BxL == 2, num_global_slots)
        h = LongformerEmbeddings(cfg, name="embeddings")(
            input_ids, token_type_ids, position_ids, inputs_embeds, deterministic
        )
        # A row with more global tokens than slots cannot be computed exactly: make it loud.
        h = jnp.where(slots.overflow_B[:, None, None], jnp.nan, h)
        h, hidden_states, attentions, global_attentions = LongformerEncoder(
            cfg, deterministic, output_attentions, output_hidden_states, name="encoder"
        )(h, mask_BxL, slots)

        h = h[:, :L]
        if hidden_states is not None:
            hidden_states = tuple(x[:, :L] for x in hidden_states)
        if attentions is not None:
            # HF layout: (B, heads, L, x + 2w + 1) with x the batch's largest number of global tokens.
            keep = largest if auto_slots else num_global_slots
            attentions = tuple(_trim_global_columns(a, num_global_slots, keep, L) for a in attentions)
        if global_attentions is not None:
            keep = largest if auto_slots else num_global_slots
            if keep == 0:
                global_attentions = None
            else:
                # (B, heads, G, L_padded) -> (B, heads, L_padded, x): HF does not cut it back.
                global_attentions = tuple(jnp.swapaxes(g[:, :, :keep], 2, 3) for g in global_attentions)
        pooled = LongformerPooler(cfg, name="pooler")(h) if self.add_pooling_layer else None
        return LongformerBaseModelOutput(
            last_hidden_state=h,
            pooler_output=pooled,
            hidden_states=hidden_states,
            attentions=attentions,
            global_attentions=global_attentions,
        )


def _trim_global_columns(a, num_slots: int, keep: int, length: int):
    a = a[:, :, :length]
    if keep < num_slots:
        a = jnp.concatenate([a[..., :keep], a[..., num_slots:]], axis=-1)
    return a
