"""Hugging Face state dict <-> Flax params: the one home of the name and layout mapping (no file I/O).

The Flax parameter tree uses the HF names (``longformer_jax.modeling``), so the mapping is one rule:
``a.b.c.weight`` <-> ``(a, b, c, kernel)`` for a Linear (transposed: torch stores (out, in)),
``(.., embedding)`` for an Embedding, ``(.., scale)`` for a LayerNorm weight; ``layer.{i}`` <->
``layer_{i}`` (or row ``i`` of the stacked ``layer`` subtree when ``scan_layers`` is on).

Quirks accepted on the way in (``../shared/SPEC.md``): the prefixes ``longformer.``, none (a bare
``LongformerModel``) and ``roberta.`` (allenai's originals); ``*position_ids`` buffers are ignored;
the tied ``lm_head.decoder.{weight,bias}`` are re-tied; checkpoints without ``*_global``
projections get copies of the local ones. Anything else that does not fit fails with the full
list of missing, unexpected and wrongly shaped keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax.config import LongformerConfig
from longformer_jax.tasks import build_model, check_task, has_pooler, init_params

logger = logging.getLogger(__name__)

_BACKBONE = ("embeddings.", "encoder.", "pooler.")


# ---------------------------------------------------------------------------------------- names
def _path_to_hf_key(path: tuple[str, ...]) -> str:
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"layer_(\d+)", p)
        parts.append(f"layer.{m.group(1)}" if m else p)
    leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join([*parts, leaf])


def _unstack_layers(flat: dict[tuple, Any], num_layers: int) -> dict[tuple, Any]:
    """encoder/layer/<...> with a leading layer axis -> encoder/layer_i/<...>."""
    out = {}
    for path, value in flat.items():
        if "encoder" in path:
            i = path.index("encoder")
            if len(path) > i + 1 and path[i + 1] == "layer":
                # nn.scan over _ScanLayer adds one more "layer" level.
                rest = path[i + 2 :]
                if rest and rest[0] == "layer":
                    rest = rest[1:]
                for n in range(num_layers):
                    row = (
                        jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
                        if isinstance(value, jax.ShapeDtypeStruct)
                        else value[n]
                    )
                    out[path[: i + 1] + (f"layer_{n}",) + rest] = row
                continue
        out[path] = value
    return out


def _stack_layers(flat: dict[tuple, Any], num_layers: int) -> dict[tuple, Any]:
    out, stacked = {}, {}
    for path, value in flat.items():
        m = None
        if "encoder" in path:
            i = path.index("encoder")
            m = re.fullmatch(r"layer_(\d+)", path[i + 1]) if len(path) > i + 1 else None
        if m:
            key = path[: i + 1] + ("layer", "layer") + path[i + 2 :]
            stacked.setdefault(key, [None] * num_layers)[int(m.group(1))] = value
        else:
            out[path] = value
    for key, values in stacked.items():
        out[key] = np.stack([np.asarray(v) for v in values])
    return out


def _flat_per_layer(params, config: LongformerConfig) -> dict[tuple, Any]:
    """The params as {path: leaf} with one ``layer_i`` subtree per layer, whatever the layout."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return _unstack_layers(flat, config.num_hidden_layers) if config.scan_layers else flat


def is_scanned(params: Mapping) -> bool:
    """True when the encoder holds one stacked ``layer`` subtree (a ``scan_layers=True`` model)."""
    for root in (params.get("longformer"), params):
        if isinstance(root, Mapping) and isinstance(root.get("encoder"), Mapping):
            return "layer" in root["encoder"]
    return False


def _expected(config: LongformerConfig, task: str) -> tuple[dict[str, tuple], dict[tuple, Any]]:
    """({hf key: params path}, {params path: ShapeDtypeStruct}) of ``task``'s model, from its abstract init."""
    flat_abs = _flat_per_layer(init_params(build_model(config, task), 0, abstract=True), config)
    return {_path_to_hf_key(p): p for p in flat_abs}, flat_abs


def _torch_shape(path: tuple, shape) -> tuple[int, ...]:
    return tuple(shape)[::-1] if path[-1] == "kernel" else tuple(shape)


def state_dict_shapes(config: LongformerConfig, task: str = "masked-lm") -> dict[str, tuple[int, ...]]:
    """{HF key: tensor shape in torch layout} of ``task``'s model for ``config`` (nothing is computed)."""
    keys, flat_abs = _expected(config, check_task(task))
    return {k: _torch_shape(p, flat_abs[p].shape) for k, p in keys.items()}


# ---------------------------------------------------------------------------------------- Flax -> HF
def state_dict_from_params(params, config: LongformerConfig, task: str = "masked-lm", include_tied: bool = False):
    """Flax params -> HF state dict of numpy float32 arrays (torch layout, HF names).

    Tied tensors (``lm_head.decoder.{weight,bias}``) are left out, as ``save_pretrained`` does,
    unless ``include_tied``.
    """
    check_task(task)
    sd = {}
    for path, value in _flat_per_layer(params, config).items():
        value = np.asarray(jax.device_get(value), dtype=np.float32)
        if path[-1] == "kernel":
            value = value.T
        sd[_path_to_hf_key(path)] = np.ascontiguousarray(value)
    if include_tied and task == "masked-lm":
        if config.tie_word_embeddings:
            sd["lm_head.decoder.weight"] = sd["longformer.embeddings.word_embeddings.weight"]
        sd["lm_head.decoder.bias"] = sd["lm_head.bias"]
    return sd


# ---------------------------------------------------------------------------------------- HF -> Flax
def to_numpy(v) -> np.ndarray:
    """A torch tensor, JAX or numpy array as a numpy array (bfloat16 widened to float32)."""
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    if hasattr(v, "dtype") and str(v.dtype) == "bfloat16":
        return np.asarray(jax.device_get(v), dtype=np.float32)
    return np.asarray(v)


def _normalise_keys(state_dict: Mapping[str, Any], task: str) -> dict[str, Any]:
    """Strip/rename the prefixes seen in the wild to the layout of ``task``'s HF class."""
    sd = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue  # a buffer, not a parameter
        if k.startswith("roberta."):
            k = "longformer." + k[len("roberta.") :]
        sd[k] = v
    has_prefix = any(k.startswith("longformer.") for k in sd)
    bare = any(k.startswith(_BACKBONE) for k in sd)
    if task == "base":
        if has_prefix:
            sd = {k[len("longformer.") :]: v for k, v in sd.items() if k.startswith("longformer.")} | {
                k: v for k, v in sd.items() if not k.startswith("longformer.") and k.startswith(_BACKBONE)
            }
    elif bare and not has_prefix:
        sd = {("longformer." + k if k.startswith(_BACKBONE) else k): v for k, v in sd.items()}
    return sd


def _prepare(state_dict: Mapping[str, Any], config: LongformerConfig, task: str, expected) -> dict[str, np.ndarray]:
    """Normalised keys, numpy values, the LM decoder re-tied, missing global projections copied."""
    sd = {k: to_numpy(v) for k, v in _normalise_keys(state_dict, task).items()}
    if "lm_head.decoder.bias" in sd and "lm_head.bias" not in sd:
        sd["lm_head.bias"] = sd["lm_head.decoder.bias"]
    sd.pop("lm_head.decoder.bias", None)
    if config.tie_word_embeddings:
        sd.pop("lm_head.decoder.weight", None)
    for key in expected:
        m = re.fullmatch(r"(.*attention\.self\.)(query|key|value)_global\.(weight|bias)", key)
        if m and key not in sd:
            local = f"{m.group(1)}{m.group(2)}.{m.group(3)}"
            if local in sd:
                sd[key] = sd[local].copy()
    return sd


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _check_keys(sd, expected, flat_abs, config, task, allow_new_head, source) -> list[str]:
    """Raises ValueError listing every missing, unexpected and wrongly shaped key; returns the head keys
    to initialise fresh."""

    def in_backbone(k: str) -> bool:
        return k.startswith(_BACKBONE) if task == "base" else k.startswith("longformer.")

    def is_pooler(k: str) -> bool:
        return k.startswith(("pooler.", "longformer.pooler."))

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    # A head (or a pooler) absent from the checkpoint may be initialised fresh, as transformers does.
    missing_backbone = [k for k in missing if in_backbone(k) and not is_pooler(k)]
    missing_head = [k for k in missing if k not in missing_backbone]
    # Keys of another head (an lm_head under a classifier, say) or an unused pooler are dropped.
    other_head = [k for k in unexpected if not in_backbone(k) or is_pooler(k)]
    hard_unexpected = [k for k in unexpected if k not in other_head]
    wrong_shape = []
    for k, path in expected.items():
        want = _torch_shape(path, flat_abs[path].shape)
        if k in sd and tuple(sd[k].shape) != want:
            wrong_shape.append(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {want}")
    if missing_backbone or hard_unexpected or wrong_shape or (missing_head and not allow_new_head):
        lines = [
            f"cannot load {source} into a Longformer {task} model (config: hidden {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, vocab {config.vocab_size}):"
        ]
        miss = missing_backbone + (missing_head if not allow_new_head else [])
        if miss:
            lines.append(f"  missing keys ({len(miss)}): {_short(miss)}")
        if hard_unexpected:
            lines.append(f"  unexpected keys ({len(hard_unexpected)}): {_short(hard_unexpected)}")
        if wrong_shape:
            lines.append(f"  wrongly shaped keys ({len(wrong_shape)}): {_short(wrong_shape)}")
        lines.append("  check that config.json belongs to these weights and that the task is right.")
        raise ValueError("\n".join(lines))
    if other_head:
        logger.warning("ignoring %d keys of another head: %s", len(other_head), _short(other_head))
    return missing_head


def params_from_state_dict(
    state_dict: Mapping[str, Any],
    config: LongformerConfig,
    task: str = "masked-lm",
    *,
    rng: jax.Array | int = 0,
    allow_new_head: bool = True,
    source: str = "state dict",
):
    """HF state dict (numpy / torch tensors) -> Flax params for ``task``.

    The encoder must be complete. A head absent from the checkpoint (e.g. a classifier on top of an
    MLM checkpoint) is initialised fresh, with a warning, as ``transformers`` does, unless
    ``allow_new_head=False``. Raises ValueError listing every missing, unexpected or wrongly
    shaped key.
    """
    check_task(task)
    expected, flat_abs = _expected(config, task)
    sd = _prepare(state_dict, config, task, expected)
    missing_head = _check_keys(sd, expected, flat_abs, config, task, allow_new_head, source)
    fresh = None
    if missing_head:
        logger.warning("initialising new %s head parameters: %s", task, _short(missing_head))
        fresh = _flat_per_layer(init_params(build_model(config, task), rng), config)
    flat = {}
    for k, path in expected.items():
        if k in sd:
            v = sd[k].T if path[-1] == "kernel" else sd[k]
            flat[path] = np.ascontiguousarray(v, dtype=np.float32)
        else:
            flat[path] = np.asarray(fresh[path], dtype=np.float32)
    if config.scan_layers:
        flat = _stack_layers(flat, config.num_hidden_layers)
    return jax.tree_util.tree_map(jnp.asarray, flax.traverse_util.unflatten_dict(flat))


# ---------------------------------------------------------------------------------------- between models
def convert_params(
    params,
    config: LongformerConfig,
    task: str,
    to_task: str | None = None,
    *,
    scan_layers: bool | None = None,
    allow_new_head: bool = True,
    rng: jax.Array | int = 0,
    source: str = "params",
) -> tuple[LongformerConfig, Any]:
    """``task``'s params (laid out as ``config`` says) -> ``(config, params)`` of ``to_task`` and/or the
    other layer layout (``scan_layers``), through the HF state dict.

    Moving to ``"base"`` without new parameters keeps a pooler only when the params hold one.
    """
    to_task = check_task(to_task or task)
    state = state_dict_from_params(params, config, task)
    new_config = config if scan_layers is None else config.replace(scan_layers=scan_layers)
    new_config = base_pooler_setting(new_config, to_task, state, allow_new_head)
    return new_config, params_from_state_dict(
        state, new_config, to_task, rng=rng, allow_new_head=allow_new_head, source=source
    )


def base_pooler_setting(
    config: LongformerConfig, task: str, state_dict: Mapping[str, Any], allow_new_head: bool
) -> LongformerConfig:
    """For a ``"base"`` model whose config does not say: a pooler when the weights hold one, or when new
    parameters may be initialised (``transformers``' default); otherwise none."""
    if task != "base" or "add_pooling_layer" in config.extra or allow_new_head:
        return config
    return config.replace(extra={**config.extra, "add_pooling_layer": has_pooler(state_dict)})
