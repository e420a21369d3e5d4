"""Hugging Face state dict <-> Flax params, and ``load_pretrained`` / ``save_pretrained``.

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

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax.config import LongformerConfig
from longformer_jax.heads import TASKS
from longformer_jax.modeling import LongformerModel

logger = logging.getLogger(__name__)

HF_ARCHITECTURES = {
    "base": "LongformerModel",
    "masked-lm": "LongformerForMaskedLM",
    "sequence-classification": "LongformerForSequenceClassification",
    "token-classification": "LongformerForTokenClassification",
    "question-answering": "LongformerForQuestionAnswering",
    "multiple-choice": "LongformerForMultipleChoice",
    "document-classification": "LongformerForDocumentClassification",
    "sequential-sentence-classification": "LongformerForSequentialSentenceClassification",
}
_TASK_OF_ARCH = {v: k for k, v in HF_ARCHITECTURES.items()}

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


# ---------------------------------------------------------------------------------------- models
def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; expected one of {sorted(TASKS)}.")
    return task


def build_model(config: LongformerConfig, task: str = "masked-lm") -> nn.Module:
    """The Flax module for ``task`` (the names of ``HF_ARCHITECTURES``)."""
    check_task(task)
    if task == "base":
        return LongformerModel(config, add_pooling_layer=bool(config.extra.get("add_pooling_layer", True)))
    cls = TASKS[task]
    kwargs = {}
    if task in ("document-classification", "sequential-sentence-classification"):
        kwargs["sentence_block_size"] = int(config.extra.get("sentence_block_size", 128))
    if task == "document-classification":
        kwargs["pooling"] = str(config.extra.get("pooling", "max"))
    return cls(config, **kwargs)


def task_of_model(model: nn.Module) -> str:
    if isinstance(model, LongformerModel):
        return "base"
    for task, cls in TASKS.items():
        if cls is not None and type(model) is cls:
            return task
    raise ValueError(f"{type(model).__name__} is not a longformer_jax model.")


def _dummy_inputs(config: LongformerConfig, task: str):
    L = config.max_window
    shape = (1, 2, L) if task == "multiple-choice" else (1, L)
    return jnp.full(shape, config.bos_token_id, jnp.int32)


def init_params(model: nn.Module, rng: jax.Array | int = 0, abstract: bool = False):
    """Fresh parameters (HF's initialisation: normal(initializer_range), LayerNorm 1/0)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    task = task_of_model(model)
    ids = _dummy_inputs(model.config, task)
    kwargs = {"global_attention_mask": jnp.zeros_like(ids), "num_global_slots": 0}
    if task in ("document-classification", "sequential-sentence-classification"):
        ids = jnp.full((1, model.sentence_block_size), model.config.bos_token_id, jnp.int32)
        ids = jnp.pad(
            ids, ((0, 0), (0, (-ids.shape[1]) % model.config.max_window)), constant_values=model.config.pad_token_id
        )
        kwargs = {"global_attention_mask": jnp.zeros_like(ids), "num_global_slots": 0}
    init = lambda r: model.init(r, ids, **kwargs)["params"]
    if abstract:
        return jax.eval_shape(init, rng)
    return jax.jit(init)(rng)


# ---------------------------------------------------------------------------------------- mapping
def _flax_leaf_to_hf(name: str) -> str:
    return {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(name, name)


def _path_to_hf_key(path: tuple[str, ...]) -> str:
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"layer_(\d+)", p)
        parts.append(f"layer.{m.group(1)}" if m else p)
    parts.append(_flax_leaf_to_hf(path[-1]))
    return ".".join(parts)


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


def state_dict_from_params(params, config: LongformerConfig, task: str = "masked-lm", include_tied: bool = False):
    """Flax params -> HF state dict of numpy float32 arrays (torch layout, HF names).

    Tied tensors (``lm_head.decoder.{weight,bias}``) are left out, as ``save_pretrained`` does,
    unless ``include_tied``.
    """
    check_task(task)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    if config.scan_layers:
        flat = _unstack_layers(flat, config.num_hidden_layers)
    sd = {}
    for path, value in flat.items():
        value = np.asarray(jax.device_get(value), dtype=np.float32)
        if path[-1] == "kernel":
            value = value.T
        sd[_path_to_hf_key(path)] = np.ascontiguousarray(value)
    if include_tied and task == "masked-lm":
        if config.tie_word_embeddings:
            sd["lm_head.decoder.weight"] = sd["longformer.embeddings.word_embeddings.weight"]
        sd["lm_head.decoder.bias"] = sd["lm_head.bias"]
    return sd


def _normalise_keys(state_dict: Mapping[str, Any], task: str) -> dict[str, Any]:
    """Strip/rename the prefixes seen in the wild to the layout of ``task``'s HF class."""
    sd = {}
    for k, v in state_dict.items():
        if k.endswith("position_ids"):
            continue  # a buffer, not a parameter
        if k.startswith("roberta."):
            k = "longformer." + k[len("roberta.") :]
        sd[k] = v
    backbone = ("embeddings.", "encoder.", "pooler.")
    has_prefix = any(k.startswith("longformer.") for k in sd)
    bare = any(k.startswith(backbone) for k in sd)
    if task == "base":
        if has_prefix:
            sd = {k[len("longformer.") :]: v for k, v in sd.items() if k.startswith("longformer.")} | {
                k: v for k, v in sd.items() if not k.startswith("longformer.") and k.startswith(backbone)
            }
    elif bare and not has_prefix:
        sd = {("longformer." + k if k.startswith(backbone) else k): v for k, v in sd.items()}
    return sd


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
    model = build_model(config, task)
    abstract = init_params(model, 0, abstract=True)
    flat_abs = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
    if config.scan_layers:
        flat_abs = _unstack_layers(flat_abs, config.num_hidden_layers)
    expected = {_path_to_hf_key(p): p for p in flat_abs}

    sd = _normalise_keys(state_dict, task)
    sd = {k: _to_numpy(v) for k, v in sd.items()}
    # Re-tie the LM decoder.
    if "lm_head.decoder.bias" in sd and "lm_head.bias" not in sd:
        sd["lm_head.bias"] = sd["lm_head.decoder.bias"]
    sd.pop("lm_head.decoder.bias", None)
    if config.tie_word_embeddings:
        sd.pop("lm_head.decoder.weight", None)
    # Checkpoints without global projections get copies of the local ones.
    for key in list(expected):
        m = re.fullmatch(r"(.*attention\.self\.)(query|key|value)_global\.(weight|bias)", key)
        if m and key not in sd:
            local = f"{m.group(1)}{m.group(2)}.{m.group(3)}"
            if local in sd:
                sd[key] = sd[local].copy()

    def in_backbone(k: str) -> bool:
        return k.startswith(("embeddings.", "encoder.", "pooler.")) if task == "base" else k.startswith("longformer.")

    def is_pooler(k: str) -> bool:
        return k.startswith(("pooler.", "longformer.pooler."))

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    # A head (or a pooler) absent from the checkpoint may be initialised fresh, as transformers does.
    missing_backbone = [k for k in missing if in_backbone(k) and not is_pooler(k)]
    missing_head = [k for k in missing if k not in missing_backbone]
    # Keys of another head (an lm_head under a classifier, say) or an unused pooler are dropped.
    other_head = [k for k in unexpected if not in_backbone(k) or is_pooler(k)]
    wrong_shape = []
    for k, path in expected.items():
        if k in sd:
            want = tuple(flat_abs[path].shape)
            have = sd[k].shape[::-1] if path[-1] == "kernel" else sd[k].shape
            if tuple(have) != want:
                wrong_shape.append(
                    f"{k}: checkpoint {tuple(sd[k].shape)} vs model {want[::-1] if path[-1] == 'kernel' else want}"
                )
    hard_unexpected = [k for k in unexpected if k not in other_head]
    if missing_backbone or hard_unexpected or wrong_shape or (missing_head and not allow_new_head):
        lines = [
            f"cannot load {source} into a Longformer {task} model (config: hidden {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, vocab {config.vocab_size}):"
        ]
        if missing_backbone or (missing_head and not allow_new_head):
            miss = missing_backbone + (missing_head if not allow_new_head else [])
            lines.append(f"  missing keys ({len(miss)}): {_short(miss)}")
        if hard_unexpected:
            lines.append(f"  unexpected keys ({len(hard_unexpected)}): {_short(hard_unexpected)}")
        if wrong_shape:
            lines.append(f"  wrongly shaped keys ({len(wrong_shape)}): {_short(wrong_shape)}")
        lines.append("  check that config.json belongs to these weights and that the task is right.")
        raise ValueError("\n".join(lines))
    if other_head:
        logger.warning("ignoring %d keys of another head: %s", len(other_head), _short(other_head))
    flat = {}
    fresh = None
    if missing_head:
        logger.warning("initialising new %s head parameters: %s", task, _short(missing_head))
        fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(init_params(model, rng)))
        if config.scan_layers:
            fresh = _unstack_layers(fresh, config.num_hidden_layers)
    for k, path in expected.items():
        if k in sd:
            v = sd[k].T if path[-1] == "kernel" else sd[k]
            flat[path] = np.ascontiguousarray(v, dtype=np.float32)
        else:
            flat[path] = np.asarray(fresh[path], dtype=np.float32)
    if config.scan_layers:
        flat = _stack_layers(flat, config.num_hidden_layers)
    return jax.tree_util.tree_map(jnp.asarray, flax.traverse_util.unflatten_dict(flat))


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return (
        np.asarray(jax.device_get(v), dtype=np.float32)
        if hasattr(v, "dtype") and str(v.dtype) == "bfloat16"
        else np.asarray(v)
    )


# ---------------------------------------------------------------------------------------- files
def read_state_dict(directory: str) -> dict[str, np.ndarray]:
    """Weights of an HF directory: model.safetensors (no torch needed) or pytorch_model.bin.

    A ``.bin`` is a pickle: it is read only with ``torch.load(weights_only=True)``, which refuses
    any pickle that would run code.
    """
    files = {f: os.path.join(directory, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(directory, f))}
    if "model.safetensors" in files:
        return _read_safetensors(files["model.safetensors"])
    if "model.safetensors.index.json" in files:
        return _read_index(files["model.safetensors.index.json"], _read_safetensors)
    if "pytorch_model.bin" in files:
        return _read_bin(files["pytorch_model.bin"])
    if "pytorch_model.bin.index.json" in files:
        return _read_index(files["pytorch_model.bin.index.json"], _read_bin)
    raise ValueError(f"no weights in {directory!r}: expected one of {', '.join(WEIGHT_FILES)}.")


def _read_index(index_file: str, reader) -> dict[str, np.ndarray]:
    with open(index_file) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    sd = {}
    for shard in shards:
        sd.update(reader(os.path.join(os.path.dirname(index_file), shard)))
    return sd


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors.flax import load_file

    try:
        tensors = load_file(file)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"cannot read {file}: {e}") from None
    return {k: np.asarray(v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v) for k, v in tensors.items()}


def _read_bin(file: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{file} is a PyTorch pickle and reading it needs torch: `pip install torch` (a CPU build is enough), "
            "or convert the checkpoint to model.safetensors."
        ) from None
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        detail = f" (it asks for {m.group(1)})" if m else ""
        raise ValueError(
            f"refusing to load {file}: the pickle holds more than tensors{detail}, which could run code when "
            "unpickled; only torch.load(weights_only=True) is used. Use the checkpoint's model.safetensors, or "
            "re-save its state dict as safetensors where you trust the file."
        ) from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{file} does not hold a state dict (found {type(sd).__name__}).")
    return {k: _to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def resolve_pretrained(path: str | os.PathLike) -> str:
    """A local directory, or a hub id downloaded (config, weights and tokenizer files only; no code)."""
    from longformer_jax.conversion import resolve_source

    return str(resolve_source(path))


def load_pretrained(
    path: str | os.PathLike,
    task: str = "masked-lm",
    *,
    allow_new_head: bool = True,
    rng: jax.Array | int = 0,
    **config_overrides,
):
    """Load ``(model, params)`` from an HF directory, a hub id, or a converted Flax checkpoint.

    ``config_overrides`` set fields of :class:`LongformerConfig` (e.g. ``dtype="bfloat16"``,
    ``remat=True``, ``scan_layers=True``, ``num_labels=3``).
    """
    check_task(task)
    directory = resolve_pretrained(path)
    from longformer_jax import conversion

    if conversion.is_flax_checkpoint(directory):
        config, saved_task, params = conversion.load_flax_checkpoint(directory)
        config = config.replace(**config_overrides) if config_overrides else config
        if saved_task != task:
            sd = state_dict_from_params(params, config.replace(scan_layers=False), saved_task)
            params = params_from_state_dict(sd, config, task, rng=rng, allow_new_head=allow_new_head, source=directory)
        elif config.scan_layers:
            sd = state_dict_from_params(params, config.replace(scan_layers=False), task)
            params = params_from_state_dict(sd, config, task, rng=rng, source=directory)
        return build_model(config, task), params
    config = LongformerConfig.from_pretrained(directory, **config_overrides)
    sd = read_state_dict(directory)
    params = params_from_state_dict(sd, config, task, rng=rng, allow_new_head=allow_new_head, source=directory)
    return build_model(config, task), params


def save_pretrained(directory: str | os.PathLike, model: nn.Module, params, tokenizer=None) -> str:
    """Write an HF directory (config.json, model.safetensors, tokenizer files) that loads in
    ``transformers`` unchanged (tied tensors left out as HF does). ``tokenizer``: a transformers
    tokenizer or a directory holding tokenizer files."""
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    config: LongformerConfig = model.config
    task = task_of_model(model)
    extra = dict(config.extra)
    if task == "base":
        extra["add_pooling_layer"] = model.add_pooling_layer
    if task in ("document-classification", "sequential-sentence-classification"):
        extra["sentence_block_size"] = model.sentence_block_size
    if task == "document-classification":
        extra["pooling"] = model.pooling
    config = config.replace(extra=extra)
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory, architectures=[HF_ARCHITECTURES[task]])
    sd = state_dict_from_params(params, config, task)
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    return directory


def save_tokenizer(tokenizer, directory: str) -> list[str]:
    """Copy tokenizer files (from a directory) or save a tokenizer object into ``directory``."""
    if isinstance(tokenizer, (str, os.PathLike)):
        src = os.fspath(tokenizer)
        copied = []
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, f)):
                if os.path.abspath(src) != os.path.abspath(directory):
                    shutil.copy(os.path.join(src, f), os.path.join(directory, f))
                copied.append(f)
        return copied
    return list(tokenizer.save_pretrained(directory))


def task_from_config(directory: str, default: str = "masked-lm") -> str:
    """The task of an HF directory's ``architectures`` entry (``default`` when absent)."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            arch = (json.load(f).get("architectures") or [None])[0]
    except (OSError, json.JSONDecodeError):
        return default
    return _TASK_OF_ARCH.get(arch, default)
