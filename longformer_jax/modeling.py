"""Flax Linen modules of the Longformer encoder: embeddings, layer, encoder, LongformerModel.

Module and parameter names are the Hugging Face state-dict names (``longformer_jax.state_dict`` maps them
one to one). The attention math lives in :mod:`longformer_jax.attention`; modules only hold the
parameters and call it. What happens to the inputs first (checks, merged mask, padding to the
window multiple, the static number of global slots) is :func:`longformer_jax.inputs.prepare_inputs`;
``LongformerModel`` runs on its result and cuts the outputs back to HF's exact layout.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax import attention as attn
from longformer_jax import kernels, sequence_parallel
from longformer_jax.config import LongformerConfig
from longformer_jax.dropout import Dropout
from longformer_jax.inputs import ModelInputs, prepare_inputs

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
    """HF's ``LongformerBaseModelOutputWithPooling``: the last layer's output (B, L, E), the pooler's
    output (models with a pooler) and, when asked, the per-layer outputs in HF's layout."""

    last_hidden_state: Array
    pooler_output: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    global_attentions: tuple[Array, ...] | None = None


# ---------------------------------------------------------------------------------------- modules
def embed_with_padding_idx(table: nn.Embed, ids, padding_idx: int):
    """``table(ids)`` with no gradient into the row ``padding_idx``, as torch's ``nn.Embedding(padding_idx=...)``.

    The values are unchanged; every lookup of that row (whichever position it is at) passes no gradient,
    so the row's gradient is the one it gets elsewhere (the tied LM decoder), as in transformers.
    """
    x_BxLxE = table(ids)
    return jnp.where((ids == padding_idx)[..., None], jax.lax.stop_gradient(x_BxLxE), x_BxLxE)


class LongformerEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout. The word and position tables are built
    with transformers' ``padding_idx=pad_token_id``: their pad row gets no gradient from the lookups."""

    config: LongformerConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds=None, deterministic=True):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, name="position_embeddings")
        tok = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="token_type_embeddings")
        if inputs_embeds is None:
            inputs_embeds = embed_with_padding_idx(word, input_ids, cfg.pad_token_id)
        else:
            word(jnp.zeros((1, 1), jnp.int32))  # create the table when built from inputs_embeds
        positions = embed_with_padding_idx(pos, position_ids, cfg.pad_token_id)
        x = inputs_embeds.astype(jnp.float32) + positions + tok(token_type_ids)
        x = layer_norm(cfg, "LayerNorm")(x)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class LayerModule(nn.Module):
    """The fields shared by the modules of one layer: the config, the layer's window and dilation (an int,
    or one per head) and the call's switches."""

    config: LongformerConfig
    attention_window: int
    deterministic: bool = True
    output_attentions: bool = False
    attention_dilation: int | tuple[int, ...] = 1

    def part(self, cls: type[LayerModule], name: str) -> LayerModule:
        """The sub-module ``cls`` of this layer, with the same fields (from a compact method)."""
        return cls(
            self.config,
            self.attention_window,
            self.deterministic,
            self.output_attentions,
            attention_dilation=self.attention_dilation,
            name=name,
        )


class LongformerSelfAttention(LayerModule):
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
            block_size=cfg.attention_block_size,
            dropout_rate=rate if use_dropout else 0.0,
            dropout_rng=rng_local,
            dilation=self.attention_dilation,
            causal=cfg.causal_attention,
        )
        if not self.output_attentions and sequence_parallel.sequence_devices() > 1:
            # The document's tokens split over the mesh's "sequence" axis: the same numbers, L / n rows per device.
            out_BxHxLxD = self.split_sequence_attention(h_BxLxE, q, k, v, mask_BxL, slots, heads, scale, band_kw)
            return out_BxHxLxD.transpose(0, 2, 1, 3).reshape(B, L, H * D), None, None
        if self.output_attentions:
            out_BxHxLxD, probs = attn.sliding_window_attention_heads(
                q, k, v, mask_BxL, self.attention_window // 2, slots, return_probs=True, **band_kw
            )
        else:
            # The blocked band (chunked, with a recomputing backward pass) or a kernel with the same numbers.
            out_BxHxLxD = kernels.band_attention(
                cfg.attention_implementation, q, k, v, mask_BxL, self.attention_window // 2, slots, **band_kw
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
            drop = dict(dropout_rate=rate if use_dropout else 0.0, dropout_rng=rng_global, causal=cfg.causal_attention)
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

    def split_sequence_attention(self, h_BxLxE, q, k, v, mask_BxL, slots, heads, scale, band_kw):
        """``__call__``'s attention (B, H, L, D) under a mesh with a "sequence" axis: the same parameters
        and dropout keys, computed by :func:`longformer_jax.sequence_parallel.self_attention_heads`."""
        cfg = self.config
        E = cfg.hidden_size
        q_glob = dense(cfg, E, "query_global")
        key_global = DenseParams(cfg, E, name="key_global")(E)
        value_global = DenseParams(cfg, E, name="value_global")(E)
        qg = heads(q_glob(sequence_parallel.take_global_rows(h_BxLxE, slots))) * scale
        use_dropout = band_kw["dropout_rng"] is not None
        rng_global = self.make_rng("dropout") if use_dropout and qg.shape[2] else None
        return sequence_parallel.self_attention_heads(
            q,
            k,
            v,
            mask_BxL,
            self.attention_window // 2,
            slots,
            qg,
            h_BxLxE.astype(compute_dtype(cfg)),
            key_global,
            value_global,
            implementation=cfg.attention_implementation,
            global_dropout_rng=rng_global,
            **band_kw,
        )


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


class LongformerAttention(LayerModule):
    @nn.compact
    def __call__(self, h, mask_BxL, slots):
        a, probs, global_probs = self.part(LongformerSelfAttention, "self")(h, mask_BxL, slots)
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


class LongformerLayer(LayerModule):
    """One post-LN layer; returns the new hidden states and the layer's attention probabilities."""

    @nn.compact
    def __call__(self, h, mask_BxL, slots):
        cfg = self.config
        a, probs, global_probs = self.part(LongformerAttention, "attention")(h, mask_BxL, slots)
        z = LongformerIntermediate(cfg, apply_activation=False, name="intermediate")(a)
        out = LongformerDenseOutput(cfg, self.deterministic, activation=cfg.hidden_act, name="output")(z, a)
        return out, probs, global_probs


def remat_layer(config: LongformerConfig):
    """``LongformerLayer``, rematerialised in the backward pass when ``config.remat`` is set."""
    return nn.remat(LongformerLayer) if config.remat else LongformerLayer


class _ScanLayer(LayerModule):
    """``LongformerLayer`` in the (carry, inputs) -> (carry, outputs) form of ``nn.scan``."""

    output_hidden_states: bool = False

    @nn.compact
    def __call__(self, h, mask_BxL, slots):
        out, probs, global_probs = self.part(remat_layer(self.config), "layer")(h, mask_BxL, slots)
        return out, (h if self.output_hidden_states else None, probs, global_probs)


class LongformerEncoder(nn.Module):
    config: LongformerConfig
    deterministic: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False

    @nn.compact
    def __call__(self, h, mask_BxL, slots):
        cfg = self.config
        windows, dilations = cfg.attention_windows, cfg.attention_dilations
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
                cfg,
                windows[0],
                self.deterministic,
                self.output_attentions,
                attention_dilation=dilations[0],
                output_hidden_states=self.output_hidden_states,
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
                cfg,
                windows[i],
                self.deterministic,
                self.output_attentions,
                attention_dilation=dilations[i],
                name=f"layer_{i}",
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
    They go through :func:`~longformer_jax.inputs.prepare_inputs`; ``input_ids`` may also be the
    ``ModelInputs`` it returns (the other inputs then None).
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
        x = prepare_inputs(
            cfg,
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            num_global_slots=num_global_slots,
        )
        slots = attn.global_slots(x.mask == 2, x.num_global_slots)
        h = LongformerEmbeddings(cfg, name="embeddings")(
            x.input_ids, x.token_type_ids, x.position_ids, x.inputs_embeds, deterministic
        )
        # A row with more global tokens than slots cannot be computed exactly: make it loud.
        h = jnp.where(slots.overflow_B[:, None, None], jnp.nan, h)
        h, hidden_states, attentions, global_attentions = LongformerEncoder(
            cfg, deterministic, output_attentions, output_hidden_states, name="encoder"
        )(h, x.mask, slots)
        h = h[:, : x.length]
        pooled = LongformerPooler(cfg, name="pooler")(h) if self.add_pooling_layer else None
        return hf_layout(LongformerBaseModelOutput(h, pooled, hidden_states, attentions, global_attentions), x)


def hf_layout(out: LongformerBaseModelOutput, inputs: ModelInputs) -> LongformerBaseModelOutput:
    """The per-layer outputs cut back to HF's layout: the input's length and the kept global columns.

    With ``x = inputs.global_columns``: ``attentions`` (B, heads, L, x + 2w + 1), the ``x`` global
    columns first; ``global_attentions`` (B, heads, L_padded, x) (HF does not cut them back), None
    when ``x`` is 0."""
    L, G, keep = inputs.length, inputs.num_global_slots, inputs.global_columns
    hidden_states, attentions, global_attentions = out.hidden_states, out.attentions, out.global_attentions
    if hidden_states is not None:
        hidden_states = tuple(a[:, :L] for a in hidden_states)
    if attentions is not None:
        attentions = tuple(_trim_global_columns(a, G, keep, L) for a in attentions)
    if global_attentions is not None:
        # (B, heads, G, L_padded) -> (B, heads, L_padded, x)
        global_attentions = None if keep == 0 else tuple(jnp.swapaxes(g[:, :, :keep], 2, 3) for g in global_attentions)
    return out.replace(hidden_states=hidden_states, attentions=attentions, global_attentions=global_attentions)


def _trim_global_columns(a, num_slots: int, keep: int, length: int):
    a = a[:, :, :length]
    if keep < num_slots:
        a = jnp.concatenate([a[..., :keep], a[..., num_slots:]], axis=-1)
    return a
