"""Checkpoint I/O: the one home of reading and writing model directories.

Two on-disk formats:

* an HF directory: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``, or their sharded
  ``*.index.json`` forms) + tokenizer files. ``transformers`` reads it unchanged.
* a Flax checkpoint directory (this project's own): ``config.json`` (HF format), the tokenizer files,
  ``flax_params/`` (an Orbax checkpoint of the params pytree, restorable sharded over any mesh) and
  ``longformer_jax.json`` = ``{"format": "longformer-jax-flax", "task": ..., "version": 1}``.
  A directory may be both at once (``convert.roberta_to_longformer --format both``).

A source is a local directory or a Hugging Face hub id, of which only configuration, weight and
tokenizer files are downloaded: never code. ``pytorch_model.bin`` is a pickle: it is read only with
``torch.load(weights_only=True)``, which refuses any pickle that would import or call code.

Writers that make a whole directory (:func:`save_flax_checkpoint`, :func:`save_hf_checkpoint`) build it
in a temporary directory beside the destination and rename it into place at the end
(:func:`atomic_output_dir`), so a failure never leaves a partial destination. Readers raise
:class:`ConversionError` (a ``ValueError``) naming the file or key at fault and how to fix it.

:func:`load_pretrained` / :func:`save_pretrained` are the library's entry points.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.flax
import safetensors.numpy

from longformer_jax.config import JAX_FIELDS, PATTERN_FIELDS, LongformerConfig
from longformer_jax.state_dict import (
    base_pooler_setting,
    convert_params,
    is_scanned,
    params_from_state_dict,
    state_dict_from_params,
    to_numpy,
)
from longformer_jax.tasks import TASKS, build_model, check_task, config_for_model, infer_task, task_of_model

FORMAT_NAME = "longformer-jax-flax"
FORMAT_VERSION = 1
FORMAT_FILE = "longformer_jax.json"
PARAMS_DIR = "flax_params"
CONFIG_FILE = "config.json"

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# The files a tokenizer may consist of: copied along with the weights, fetched from the hub.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "chat_template.jinja",
)

# What a hub download may fetch: configuration, weights, tokenizer. Never code.
HUB_ALLOW_CONFIG = [CONFIG_FILE, *TOKENIZER_FILES]
HUB_ALLOW_SAFETENSORS = [SAFETENSORS_FILE, "model-*.safetensors", SAFETENSORS_INDEX]
HUB_ALLOW_BIN = [BIN_FILE, "pytorch_model-*.bin", BIN_INDEX]


class ConversionError(ValueError):
    """A checkpoint could not be read or written; the message says which file/key and why."""


# ---------------------------------------------------------------------------------------- sources
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_hub_id(src: str) -> bool:
    return (
        bool(_HUB_ID_RE.match(src)) and not src.startswith((".", "/", "~")) and ".." not in src and src.count("/") == 1
    )


def resolve_source(src: str | os.PathLike, *, allow_download: bool = True) -> Path:
    """A local directory for ``src``: an existing directory, or a hub id downloaded to the cache.

    Only configuration, weight and tokenizer files are fetched (safetensors when the repo has them,
    else ``pytorch_model*.bin``); no code is ever downloaded or run.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(
            f"{path} is a file; expected a checkpoint directory (holding config.json and "
            f"{SAFETENSORS_FILE} or {BIN_FILE}). Pass the directory that contains it."
        )
    text = os.fspath(src)
    if not (allow_download and _looks_like_hub_id(text)):
        raise ConversionError(
            f"checkpoint directory {path} does not exist. Give an existing directory holding config.json "
            f"and {SAFETENSORS_FILE} or {BIN_FILE}, or a Hugging Face hub id such as "
            "'kiddothe2b/longformer-base-4096'."
        )
    try:
        import huggingface_hub

        patterns = list(HUB_ALLOW_CONFIG)
        try:  # fetch safetensors when the repo has them, else the .bin files (never both)
            files = set(huggingface_hub.list_repo_files(text))
            has_safetensors = any(f.endswith(".safetensors") for f in files)
            patterns += HUB_ALLOW_SAFETENSORS if has_safetensors else HUB_ALLOW_BIN
        except Exception:  # offline: whatever the local cache holds
            patterns += HUB_ALLOW_SAFETENSORS + HUB_ALLOW_BIN
        local = huggingface_hub.snapshot_download(text, allow_patterns=patterns)
    except Exception as e:  # network, unknown repo, offline mode: one actionable message
        raise ConversionError(
            f"{text!r} is not a local directory ({path.resolve()} does not exist) and could not be "
            f"fetched from the Hugging Face hub: {type(e).__name__}: {e}. Check the path, or the hub id and "
            "your network access (HF_HUB_OFFLINE must be unset to download)."
        ) from e
    return Path(local)


# ---------------------------------------------------------------------------------------- config.json
def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """``directory/config.json`` as a dict, with clear errors."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(
            f"{path} not found: a checkpoint directory needs the model's config.json beside its weights."
        )
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} must hold a JSON object, found {type(cfg).__name__}.")
    return cfg


def config_from_dict(config_dict: Mapping[str, Any], source: Any = CONFIG_FILE, **options) -> LongformerConfig:
    """A :class:`LongformerConfig` from a config.json dict (a RoBERTa or other non-Longformer config is
    refused); ``options`` override fields (``dtype``, ``scan_layers``, ...)."""
    try:
        return LongformerConfig.from_dict(dict(config_dict), **options)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from e


# ---------------------------------------------------------------------------------------- weights
def find_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of an HF directory, safetensors preferred; raises when there are none."""
    d = Path(directory)
    if (d / SAFETENSORS_FILE).is_file():
        return [d / SAFETENSORS_FILE]
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = d / index_name
        if index.is_file():
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index} is not a valid weight index (needs a 'weight_map'): {e}") from e
            files = [d / name for name in sorted(set(weight_map.values()))]
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                raise ConversionError(f"{index} lists shard files that are missing: {', '.join(missing)}")
            return files
    if (d / BIN_FILE).is_file():
        return [d / BIN_FILE]
    present = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    hint = ""
    if any(n.endswith((".msgpack", ".h5", ".ckpt")) for n in present):
        hint = " (Flax msgpack / TF .h5 weights are not read; export them to safetensors with transformers)"
    raise ConversionError(
        f"no weights in {d}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX}; "
        f"found {present or 'nothing'}{hint}."
    )


def read_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """An HF directory's weights as numpy arrays, keys unchanged: safetensors (no torch needed), or a
    ``.bin`` read only through ``torch.load(weights_only=True)``."""
    d = Path(directory)
    if not d.is_dir():
        raise ConversionError(f"checkpoint directory {d} does not exist.")
    sd: dict[str, np.ndarray] = {}
    for file in find_weight_files(d):
        sd.update(_read_safetensors(file) if file.suffix == ".safetensors" else _read_bin(file))
    return sd


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors.flax.load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ConversionError(f"cannot read {file}: {e}") from None
    return {k: np.asarray(v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v) for k, v in tensors.items()}


def _read_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{file} is a PyTorch pickle and reading it needs torch: `pip install torch` (a CPU build is enough), "
            "or convert the checkpoint to model.safetensors."
        ) from None
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        detail = f" (it asks for {m.group(1)})" if m else ""
        raise ConversionError(
            f"refusing to load {file}: the pickle holds more than tensors{detail}, which could run code when "
            "unpickled; only torch.load(weights_only=True) is used. Use the checkpoint's model.safetensors, or "
            "re-save its state dict as safetensors where you trust the file."
        ) from None
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{file} does not hold a state dict (found {type(sd).__name__}).")
    return {k: to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def write_safetensors(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """A numpy state dict as safetensors with metadata format "pt" (what transformers reads)."""
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------- output directories
def check_destination(dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuses a destination that exists and is not empty (unless ``overwrite``), before any work."""
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(
            f"destination {dst} already exists and is not empty; choose a new path or pass --overwrite."
        )
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} is a file; give a directory path.")
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``dst``; renames it to ``dst`` only on success.

    On any exception the temporary directory (and any parent directory made for it) is removed and
    ``dst`` is left as it was.
    """
    dst = check_destination(dst, overwrite=overwrite)
    made = [p for p in [dst.parent, *dst.parent.parents] if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    ok = False
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        ok = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for p in made:  # innermost first
                with contextlib.suppress(OSError):
                    p.rmdir()


# ---------------------------------------------------------------------------------------- tokenizer files
def save_tokenizer(tokenizer, directory: str | os.PathLike) -> list[str]:
    """Puts a tokenizer into ``directory``; returns the file names written.

    ``tokenizer``: None (nothing), a directory (its :data:`TOKENIZER_FILES` are copied), or a
    ``transformers`` tokenizer (``save_pretrained``).
    """
    if tokenizer is None:
        return []
    if not isinstance(tokenizer, (str, os.PathLike)):
        return [os.path.basename(f) for f in tokenizer.save_pretrained(os.fspath(directory))]
    src, dst = Path(tokenizer), Path(directory)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            if (src / name).resolve() != (dst / name).resolve():
                shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def tokenizer_note(src: Any, copied: list[str]) -> str:
    """One line for a program's log: the tokenizer files carried over, or how to add them."""
    if copied:
        return f"tokenizer files copied: {', '.join(copied)}"
    return (
        f"note: the source {src} has no tokenizer files; the output has none. Copy them in by hand "
        "(e.g. tokenizer.json and tokenizer_config.json of the model this checkpoint was trained with)."
    )


# ---------------------------------------------------------------------------------------- Flax checkpoints
def is_flax_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a Flax checkpoint directory written by :func:`save_flax_checkpoint`."""
    p = Path(path)
    f = p / FORMAT_FILE
    if not (f.is_file() and (p / PARAMS_DIR).is_dir()):
        return False
    try:
        with open(f) as fh:
            return json.load(fh).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def model_settings(config: LongformerConfig) -> dict[str, Any]:
    """The JAX-side settings a Flax checkpoint keeps beside config.json (the layer layout is the params').

    Among them the attention patterns (``attention_dilation``, ``causal_attention``), written when the
    model uses one: config.json cannot hold them, so a dilated or causal model loads back the same only
    from here (a model without them writes the same file as before they existed)."""
    fields = [k for k in JAX_FIELDS if k != "scan_layers" and (k not in PATTERN_FIELDS or config.has_attention_pattern)]
    return {k: getattr(config, k) for k in fields}


def write_flax_params(
    directory: str | os.PathLike, params, task: str, settings: Mapping[str, Any] | None = None
) -> None:
    """The Flax part of a checkpoint directory: ``flax_params/`` (Orbax) and ``longformer_jax.json``
    (format, task, and the model's JAX-side ``settings``, see :func:`model_settings`).

    With config.json beside them (written by the caller) this makes ``directory`` a Flax checkpoint.
    """
    directory = Path(directory).absolute()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory / PARAMS_DIR, params)
    ckptr.wait_until_finished()
    ckptr.close()
    meta = {
        "format": FORMAT_NAME,
        "task": check_task(task),
        "version": FORMAT_VERSION,
        "settings": dict(settings or {}),
    }
    with open(directory / FORMAT_FILE, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def save_flax_checkpoint(
    dst: str | os.PathLike,
    config: LongformerConfig,
    params,
    task: str,
    tokenizer=None,
    *,
    overwrite: bool = False,
    extra_files: Callable[[Path], None] | None = None,
) -> list[str]:
    """Writes a Flax checkpoint directory ``dst`` (atomically); returns the tokenizer files written.

    ``params``: the Flax params pytree (host or sharded arrays; a scanned-layer tree is stored as given);
    ``task``: a name of ``TASKS``; ``tokenizer``: as :func:`save_tokenizer`. ``extra_files(tmpdir)`` may
    add files (e.g. an HF export) before the directory is moved into place.
    """
    check_task(task)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        # The settings transformers lacks (attention patterns) are kept in longformer_jax.json beside it.
        config.save_pretrained(tmp, architectures=[TASKS[task].hf_architecture], hf_export=False)
        copied = save_tokenizer(tokenizer, tmp)
        if extra_files is not None:
            extra_files(tmp)
        write_flax_params(tmp, params, task, model_settings(config))
    return copied


def _restore_target(metadata_tree, sharding):
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata_tree)
    if callable(sharding):
        return jax.tree_util.tree_map_with_path(
            lambda path, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding(path, m.shape)), metadata_tree
        )
    return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), metadata_tree, sharding)


def restore_orbax_tree(directory: str | os.PathLike, sharding=None):
    """Restores an Orbax pytree checkpoint; ``sharding`` as in :func:`load_flax_checkpoint`."""
    directory = Path(directory).absolute()
    ckptr = ocp.StandardCheckpointer()
    try:
        md = ckptr.metadata(directory)
        tree = getattr(md, "item_metadata", md)
        tree = getattr(tree, "tree", tree)
        return ckptr.restore(directory, _restore_target(tree, sharding))
    except Exception as e:
        raise ConversionError(f"{directory} is not a readable Orbax checkpoint: {type(e).__name__}: {e}") from e
    finally:
        ckptr.close()


def load_flax_checkpoint(path: str | os.PathLike, sharding=None, **config_options):
    """Reads a Flax checkpoint directory; returns ``(config, task, params)``.

    ``sharding``: None (every array on the default device), one ``jax.sharding.Sharding`` for all arrays,
    a pytree of shardings matching the params, or a callable ``(key_path, shape) -> Sharding``. The
    arrays are read straight into that layout (no host copy of the whole model).
    ``config_options`` go to the config (e.g. ``dtype="bfloat16"``); a ``scan_layers`` different from the
    stored layout re-stacks the params (on the host).
    """
    p = Path(path)
    if not is_flax_checkpoint(p):
        raise ConversionError(
            f"{p} is not a Flax checkpoint directory (needs {FORMAT_FILE} with format {FORMAT_NAME!r} and "
            f"{PARAMS_DIR}/). Make one with: python -m convert.hf_to_flax SRC {p}"
        )
    with open(p / FORMAT_FILE) as f:
        meta = json.load(f)
    if meta.get("version") != FORMAT_VERSION:
        raise ConversionError(
            f"{p / FORMAT_FILE}: format version {meta.get('version')}; this library reads {FORMAT_VERSION}."
        )
    task = check_task(meta.get("task", "masked-lm"))
    params = restore_orbax_tree(p / PARAMS_DIR, sharding)
    scanned = is_scanned(params)
    want_scanned = bool(config_options.pop("scan_layers", scanned))
    # The settings saved with the model, unless the caller gives others (the layer layout is the params').
    settings = {k: v for k, v in meta.get("settings", {}).items() if k in JAX_FIELDS and k != "scan_layers"}
    config = config_from_dict(
        read_config_dict(p), p / CONFIG_FILE, scan_layers=scanned, **{**settings, **config_options}
    )
    if want_scanned != scanned:
        config, params = convert_params(
            params, config, task, scan_layers=want_scanned, allow_new_head=False, source=str(p)
        )
    return config, task, params


# ---------------------------------------------------------------------------------------- HF directories
def load_hf_checkpoint(
    directory: str | os.PathLike,
    task: str | None = None,
    *,
    allow_new_head: bool = False,
    rng: jax.Array | int = 0,
    **config_options,
):
    """Reads an HF Longformer directory; returns ``(config, task, params)``.

    ``task`` None: from config.json's ``architectures``, else the weight names. With
    ``allow_new_head=False`` (a faithful conversion) a head missing from the weights is an error and a
    ``"base"`` model takes a pooler only when the weights hold one.
    """
    directory = Path(directory)
    config_dict = read_config_dict(directory)
    config = config_from_dict(config_dict, directory / CONFIG_FILE, **config_options)
    state = read_state_dict(directory)
    task = check_task(task) if task is not None else infer_task(config_dict, state, directory / CONFIG_FILE)
    config = base_pooler_setting(config, task, state, allow_new_head)
    files = ", ".join(str(f) for f in find_weight_files(directory))
    params = params_from_state_dict(state, config, task, rng=rng, allow_new_head=allow_new_head, source=files)
    return config, task, params


def save_hf_checkpoint(
    dst: str | os.PathLike, config: LongformerConfig, params, task: str, tokenizer=None, *, overwrite: bool = False
) -> list[str]:
    """Writes an HF directory ``dst`` (atomically) with :func:`save_pretrained`; returns the tokenizer files.

    A model with an attention pattern transformers lacks (dilated or causal windows) is refused before
    anything is written (``LongformerConfig.check_hf_compatible``)."""
    config.check_hf_compatible()
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        save_pretrained(tmp, build_model(config, task), params)
        return save_tokenizer(tokenizer, tmp)


def load_checkpoint(
    path: str | os.PathLike,
    task: str | None = None,
    *,
    allow_new_head: bool = False,
    rng: jax.Array | int = 0,
    **config_options,
):
    """Reads any checkpoint this library writes or reads: a Flax checkpoint directory, an HF directory or
    a hub id. Returns ``(config, task, params, directory)``.

    ``task`` None keeps the checkpoint's own task; another task keeps the encoder and takes or makes
    that task's head (made fresh only with ``allow_new_head``).
    """
    directory = resolve_source(path)
    if not is_flax_checkpoint(directory):
        config, task, params = load_hf_checkpoint(
            directory, task, allow_new_head=allow_new_head, rng=rng, **config_options
        )
        return config, task, params, directory
    config, stored, params = load_flax_checkpoint(directory, **config_options)
    if task is not None and check_task(task) != stored:
        config, params = convert_params(
            params, config, stored, task, allow_new_head=allow_new_head, rng=rng, source=f"{directory} ({stored})"
        )
    return config, task or stored, params, directory


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
    config, task, params, _ = load_checkpoint(path, task, allow_new_head=allow_new_head, rng=rng, **config_overrides)
    return build_model(config, task), params


def save_pretrained(directory: str | os.PathLike, model: nn.Module, params, tokenizer=None) -> str:
    """Write an HF directory (config.json, model.safetensors, tokenizer files) that loads in
    ``transformers`` unchanged (tied tensors left out as HF does). ``tokenizer``: a transformers
    tokenizer or a directory holding tokenizer files.

    A model with dilated or causal windows (which transformers lacks) is a ValueError, raised before
    anything is written: save it with :func:`save_flax_checkpoint`."""
    directory = os.fspath(directory)
    config = config_for_model(model)
    task = task_of_model(model)
    config.save_pretrained(directory, architectures=[TASKS[task].hf_architecture])
    write_safetensors(state_dict_from_params(params, config, task), os.path.join(directory, SAFETENSORS_FILE))
    save_tokenizer(tokenizer, directory)
    return directory
