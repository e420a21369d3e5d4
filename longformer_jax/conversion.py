"""Weight conversion: Hugging Face (PyTorch) checkpoints <-> Flax checkpoints, RoBERTa -> long Longformer.

Three on-disk formats meet here:

* an HF directory: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``, or their sharded
  ``*.index.json`` forms) + tokenizer files. ``transformers`` reads it unchanged.
* a Flax checkpoint directory (this project's own): ``config.json`` (HF format), the tokenizer files,
  ``flax_params/`` (an Orbax checkpoint of the params pytree, restorable sharded over any mesh) and
  ``longformer_jax.json`` = ``{"format": "longformer-jax-flax", "task": ..., "version": 1}``.
  A directory may be both at once (``roberta_to_longformer --format both``).
* a pretraining run: ``RUN_DIR/checkpoints/<step>/`` holding the Orbax train state; the params are
  the ``params`` entry of that state.

Every writer builds its output in a temporary directory beside the destination and renames it into
place at the end, so a failure never leaves a partial destination behind. Every reader raises
``ConversionError`` (a ``ValueError``) naming the file or key at fault and how to fix it.

``pytorch_model.bin`` is a pickle: it is read only with ``torch.load(weights_only=True)``, which refuses
any pickle that would import or call code. Nothing here runs code from a checkpoint or the Hub.
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

import numpy as np

FORMAT_NAME = "longformer-jax-flax"
FORMAT_VERSION = 1
FORMAT_FILE = "longformer_jax.json"
PARAMS_DIR = "flax_params"
CONFIG_FILE = "config.json"

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

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
HUB_ALLOW_CONFIG = ["config.json", *TOKENIZER_FILES]
HUB_ALLOW_SAFETENSORS = ["model.safetensors", "model-*.safetensors", SAFETENSORS_INDEX]
HUB_ALLOW_BIN = ["pytorch_model.bin", "pytorch_model-*.bin", BIN_INDEX]

TASKS = (
    "base",
    "masked-lm",
    "sequence-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
    "document-classification",
    "sequential-sentence-classification",
)

# HF `architectures` entry -> task.
ARCHITECTURE_TO_TASK = {
    "LongformerModel": "base",
    "LongformerForMaskedLM": "masked-lm",
    "LongformerForSequenceClassification": "sequence-classification",
    "LongformerForTokenClassification": "token-classification",
    "LongformerForQuestionAnswering": "question-answering",
    "LongformerForMultipleChoice": "multiple-choice",
    "LongformerForDocumentClassification": "document-classification",
    "LongformerForSequentialSentenceClassification": "sequential-sentence-classification",
}
TASK_TO_ARCHITECTURE = {v: k for k, v in ARCHITECTURE_TO_TASK.items()}

# Task -> transformers Auto class with a PyTorch counterpart (used by --verify and the tests).
TASK_TO_AUTO_CLASS = {
    "base": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "multiple-choice": "AutoModelForMultipleChoice",
}

ROBERTA_MODEL_TYPES = ("roberta", "xlm-roberta")


class ConversionError(ValueError):
    """A checkpoint could not be read or converted; the message says which file/key and why."""


# ----------------------------------------------------------------------------------------------
# Sources: local directories and hub ids
# ----------------------------------------------------------------------------------------------

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_hub_id(src: str) -> bool:
    return (
        bool(_HUB_ID_RE.match(src))
        and not src.startswith((".", "/", "~"))
        and ".." not in src
        and src.count("/") == 1
    )


def resolve_source(src: str | os.PathLike, *, allow_download: bool = True) -> Path:
    """Returns a local directory for `src`: an existing directory, or a hub id downloaded to the cache.

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
    text = str(src)
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


def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads ``directory/config.json`` as a dict, with clear errors."""
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


# ----------------------------------------------------------------------------------------------
# Reading HF weights (safetensors first; .bin only through the weights-only unpickler)
# ----------------------------------------------------------------------------------------------


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
                raise ConversionError(
                    f"{index} is not a valid weight index (needs a 'weight_map'): {e}") from e
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


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an HF directory's weights into numpy arrays, keys unchanged (``hf.read_state_dict``:
    safetensors, or a ``.bin`` through ``torch.load(weights_only=True)`` only)."""
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"checkpoint directory {p} does not exist.")
    find_weight_files(p)  # a clear message when there are none
    return _hf().read_state_dict(str(p))


def write_safetensors(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes a numpy state dict as safetensors with metadata format "pt" (what transformers reads)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}, str(path),
              metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Output directories written atomically
# ----------------------------------------------------------------------------------------------


def check_destination(dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuses a destination that exists and is not empty (unless `overwrite`), before any work."""
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(
            f"destination {dst} already exists and is not empty; choose a new path or pass --overwrite.")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} is a file; give a directory path.")
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `dst`; renames it to `dst` only on success.

    On any exception the temporary directory (and any parent directory made for it) is removed and
    `dst` is left as it was.
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


def copy_tokenizer_files(src: str | os.PathLike | None, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files of `src` (if any) into `dst`; returns the names copied."""
    if src is None:
        return []
    src = Path(src)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, Path(dst) / name)
            copied.append(name)
    return copied


def tokenizer_note(src: Any, copied: list[str]) -> str:
    if copied:
        return f"tokenizer files copied: {', '.join(copied)}"
    return (
        f"note: the source {src} has no tokenizer files; the output has none. Copy them in by hand "
        "(e.g. tokenizer.json and tokenizer_config.json of the model this checkpoint was trained with)."
    )


# ----------------------------------------------------------------------------------------------
# Tasks, configs and the project's model library
# ----------------------------------------------------------------------------------------------


def _hf():
    from longformer_jax import hf

    return hf


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ConversionError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}.")
    return task


def infer_task(config_dict: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None,
               source: Any = "config.json") -> str:
    """The task of a checkpoint: from config.json's `architectures`, else from its weight names."""
    for arch in config_dict.get("architectures") or ():
        if arch in ARCHITECTURE_TO_TASK:
            return ARCHITECTURE_TO_TASK[arch]
        if arch.startswith("Roberta") and "Longformer" + arch[len("Roberta"):] in ARCHITECTURE_TO_TASK:
            return ARCHITECTURE_TO_TASK["Longformer" + arch[len("Roberta"):]]
    if state_dict is not None:
        keys = set(state_dict)
        if any(k.startswith("lm_head.") for k in keys):
            return "masked-lm"
        if any(k.startswith("qa_outputs.") for k in keys):
            return "question-answering"
        if any(k.startswith("classifier.out_proj.") for k in keys):
            return "sequence-classification"
        if "classifier.weight" in keys:
            has_pooler = any(".pooler." in k or k.startswith("pooler.") for k in keys)
            return "multiple-choice" if has_pooler else "token-classification"
        return "base"
    raise ConversionError(
        f"cannot tell the task of {source}: its `architectures` ({config_dict.get('architectures')}) names "
        f"no known head. Pass --task (one of {', '.join(TASKS)})."
    )


def check_longformer_config(config_dict: Mapping[str, Any], source: Any) -> None:
    """Refuses configs that are not Longformer (BERT, RoBERTa, ...), naming config.json's model_type."""
    model_type = config_dict.get("model_type")
    if model_type == "longformer":
        return
    if model_type == "roberta" and "attention_window" in config_dict:  # allenai's original release
        return
    if model_type in ROBERTA_MODEL_TYPES:
        raise ConversionError(
            f"{source} is a {model_type!r} checkpoint (config.json model_type), not a Longformer. "
            "Make a long model from it first: "
            "python -m convert.roberta_to_longformer SRC DST --max-length 4096."
        )
    raise ConversionError(
        f"{source} has model_type {model_type!r} in config.json; expected 'longformer' (or a RoBERTa "
        "checkpoint given to convert.roberta_to_longformer). Other architectures are not supported."
    )


def model_for_task(config, task: str):
    """The Flax module for `task` (``hf.build_model``)."""
    return _hf().build_model(config, check_task(task))


def config_from_dict(config_dict: Mapping[str, Any], source: Any = "config.json", **jax_options):
    """A `LongformerConfig` from a config.json dict; `jax_options` such as ``dtype``, ``scan_layers``."""
    from longformer_jax.config import LongformerConfig

    try:
        return LongformerConfig.from_dict(dict(config_dict), **jax_options)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from e


def _write_config(config, directory: Path, task: str) -> None:
    config.save_pretrained(str(directory), architectures=[TASK_TO_ARCHITECTURE[task]])


# ----------------------------------------------------------------------------------------------
# Flax checkpoints (Orbax)
# ----------------------------------------------------------------------------------------------


def is_flax_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a Flax checkpoint directory written by `save_flax_checkpoint`."""
    p = Path(path)
    f = p / FORMAT_FILE
    if not (f.is_file() and (p / PARAMS_DIR).is_dir()):
        return False
    try:
        with open(f) as fh:
            return json.load(fh).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def _save_params_orbax(directory: Path, params) -> None:
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory.absolute(), params)
    ckptr.wait_until_finished()
    ckptr.close()


def save_flax_checkpoint(dst: str | os.PathLike, config, params, task: str,
                         tokenizer_src: str | os.PathLike | None = None, *, overwrite: bool = False,
                         extra_files: Callable[[Path], None] | None = None) -> list[str]:
    """Writes a Flax checkpoint directory `dst` (atomically); returns the tokenizer files copied.

    `config` is a `LongformerConfig`; `params` the Flax params pytree (host or sharded arrays; a
    scanned-layer tree is stored as given); `task` one of `TASKS`. `extra_files(tmpdir)` may add files
    (e.g. an HF export) before the directory is moved into place.
    """
    check_task(task)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        _write_config(config, tmp, task)
        copied = copy_tokenizer_files(tokenizer_src, tmp)
        _save_params_orbax(tmp / PARAMS_DIR, params)
        if extra_files is not None:
            extra_files(tmp)
        with open(tmp / FORMAT_FILE, "w") as f:
            json.dump({"format": FORMAT_NAME, "task": task, "version": FORMAT_VERSION}, f, indent=2)
            f.write("\n")
    return copied


def _restore_target(metadata_tree, sharding):
    import jax

    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            metadata_tree)
    if callable(sharding):
        return jax.tree_util.tree_map_with_path(
            lambda path, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding(path, m.shape)),
            metadata_tree)
    return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), metadata_tree,
                        sharding)


def restore_orbax_tree(directory: str | os.PathLike, sharding=None):
    """Restores an Orbax pytree checkpoint; `sharding` as in `load_flax_checkpoint`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    ckptr = ocp.StandardCheckpointer()
    try:
        md = ckptr.metadata(directory)
        tree = getattr(md, "item_metadata", md)
        tree = getattr(tree, "tree", tree)
        target = _restore_target(tree, sharding)
        return ckptr.restore(directory, target)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(
            f"{directory} is not a readable Orbax checkpoint: {type(e).__name__}: {e}") from e
    finally:
        ckptr.close()


def load_flax_checkpoint(path: str | os.PathLike, sharding=None, **config_options):
    """Reads a Flax checkpoint directory; returns ``(config, task, params)``.

    `sharding`: None (every array on the default device), one `jax.sharding.Sharding` for all arrays,
    a pytree of shardings matching the params, or a callable ``(key_path, shape) -> Sharding``. The
    arrays are read straight into that layout (no host copy of the whole model).
    `config_options` go to the config (e.g. ``dtype="bfloat16"``); a ``scan_layers`` different from the
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
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise ConversionError(
            f"{p / FORMAT_FILE}: format version {version}; this library reads {FORMAT_VERSION}.")
    task = check_task(meta.get("task", "masked-lm"))
    params = restore_orbax_tree(p / PARAMS_DIR, sharding)
    scanned = _is_scanned(params)
    want_scanned = bool(config_options.pop("scan_layers", scanned))
    config = config_from_dict(read_config_dict(p), p / CONFIG_FILE, scan_layers=scanned, **config_options)
    if want_scanned != scanned:
        state = _hf().state_dict_from_params(params, config, task)
        config = config.replace(scan_layers=want_scanned)
        params = _hf().params_from_state_dict(state, config, task, allow_new_head=False, source=str(p))
    return config, task, params


def _is_scanned(params: Mapping) -> bool:
    """True when the encoder holds one stacked ``layer`` subtree (a ``scan_layers=True`` model)."""
    for root in (params.get("longformer"), params):
        if isinstance(root, Mapping) and isinstance(root.get("encoder"), Mapping):
            return "layer" in root["encoder"]
    return False


# ----------------------------------------------------------------------------------------------
# HF -> Flax
# ----------------------------------------------------------------------------------------------


def params_from_hf_dir(src_dir: str | os.PathLike, task: str | None = None, **config_options):
    """Reads an HF Longformer directory; returns ``(config, task, params, config_dict)`` (params numpy)."""
    src_dir = Path(src_dir)
    config_dict = read_config_dict(src_dir)
    check_longformer_config(config_dict, src_dir / CONFIG_FILE)
    state = read_state_dict(src_dir)
    task = check_task(task) if task is not None else infer_task(config_dict, state, src_dir)
    config = config_from_dict(config_dict, src_dir / CONFIG_FILE, **config_options)
    if task == "base" and "add_pooling_layer" not in config.extra:  # a pooler only when the file has one
        has_pooler = any(".pooler." in k or k.startswith("pooler.") for k in state)
        config = config.replace(extra={**config.extra, "add_pooling_layer": has_pooler})
    files = ", ".join(str(f) for f in find_weight_files(src_dir))
    try:  # a converter is faithful: a head missing from the checkpoint is an error, not a fresh init
        params = _hf().params_from_state_dict(state, config, task, allow_new_head=False, source=files)
    except ConversionError:
        raise
    except (ValueError, KeyError) as e:
        raise ConversionError(str(e) if files in str(e) else f"{files}: {e}") from e
    return config, task, params, config_dict


def hf_to_flax(src: str | os.PathLike, dst: str | os.PathLike, task: str | None = None, *,
               verify: bool = False, tolerance: float | None = None, overwrite: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """HF directory or hub id -> Flax checkpoint directory. Returns a summary dict.

    `verify`: compare against the PyTorch model first (``summary["max_abs_diff"]``); with `tolerance`,
    a larger difference raises and nothing is written.
    """
    check_destination(dst, overwrite=overwrite)
    src_dir = resolve_source(src)
    config, task, params, _ = params_from_hf_dir(src_dir, task)
    summary: dict[str, Any] = {"task": task, "src": str(src_dir), "dst": str(dst)}
    if verify:
        diff = verify_against_pytorch(src_dir, config, params, task, log=log)
        summary["max_abs_diff"] = diff
        if tolerance is not None and not diff <= tolerance:
            raise ConversionError(
                f"verification failed: max abs diff {diff:.3e} between PyTorch and Flax exceeds "
                f"{tolerance:g}; "
                f"nothing written to {dst}.")
    copied = save_flax_checkpoint(dst, config, params, task, tokenizer_src=src_dir, overwrite=overwrite)
    summary["tokenizer_files"] = copied
    n = sum(int(np.prod(np.shape(x))) for x in _tree_leaves(params))
    log(f"wrote Flax checkpoint {dst} (task {task}, {n:,} parameters)")
    log(tokenizer_note(src_dir, copied))
    return summary


def _tree_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------------------------
# Verification against PyTorch
# ----------------------------------------------------------------------------------------------


def _verify_inputs(config_dict: Mapping, task: str, seed: int, seq_len: int | None, num_global: int):
    rng = np.random.default_rng(seed)
    windows = config_dict.get("attention_window", 512)
    windows = list(windows) if isinstance(windows, (list, tuple)) else [windows]
    pad = int(config_dict.get("pad_token_id", 1))
    max_len = int(config_dict.get("max_position_embeddings", 514)) - pad - 1
    if seq_len is None:
        seq_len = min(max_len, 2 * max(windows) + 3)
    seq_len = max(2, min(seq_len, max_len))
    vocab = int(config_dict.get("vocab_size"))
    lo = min(5, vocab - 1)
    batch = 2
    ids = rng.integers(lo, vocab, size=(batch, seq_len)).astype(np.int64)
    attn = np.ones_like(ids)
    ids[1, -max(1, seq_len // 5):] = pad  # second row padded at the end
    attn[1, -max(1, seq_len // 5):] = 0
    glob = np.zeros_like(ids)
    glob[:, 0] = 1
    for row in range(batch):  # a different number of global tokens per row
        k = min(num_global - 1 + row, seq_len - 1)
        if k > 0:
            glob[row, rng.choice(np.arange(1, seq_len), size=k, replace=False)] = 1
    if task == "multiple-choice":
        ids, attn, glob = (np.stack([x, x[::-1]], axis=1) for x in (ids, attn, glob))
    return ids, attn, glob


def verify_against_pytorch(hf_dir: str | os.PathLike, config, params, task: str, *, seed: int = 0,
                           seq_len: int | None = None, num_global: int = 3,
                           log: Callable[[str], None] = print) -> float:
    """Runs the PyTorch model of `hf_dir` and the Flax model on the same random input; max abs diff.

    The input has padding and a few global tokens (a different number per row). Heads without a
    PyTorch class (document/sequential-sentence classification) compare the encoder output.
    """
    import jax
    import torch
    import transformers

    hf_dir = Path(hf_dir)
    config_dict = read_config_dict(hf_dir)
    ids, attn, glob = _verify_inputs(config_dict, task, seed, seq_len, num_global)
    compare_task = task if task in TASK_TO_AUTO_CLASS else "base"
    auto = getattr(transformers, TASK_TO_AUTO_CLASS[compare_task])
    pt_model = auto.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        pt_out = pt_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attn),
                          global_attention_mask=torch.from_numpy(glob))
    cfg32 = config.replace(dtype="float32")
    if compare_task == task:
        module, fparams = model_for_task(cfg32, task), params
    else:  # a head with no PyTorch class: compare the encoder
        from longformer_jax.modeling import LongformerModel

        fparams = params["longformer"]
        module = LongformerModel(cfg32, add_pooling_layer="pooler" in fparams)
    with jax.default_matmul_precision("highest"):
        fx_out = module.apply({"params": fparams}, ids.astype(np.int32), attention_mask=attn.astype(np.int32),
                              global_attention_mask=glob.astype(np.int32), deterministic=True)
    worst = 0.0
    for name in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        a = getattr(pt_out, name, None)
        b = getattr(fx_out, name, None)
        if a is None or b is None:
            continue
        a = a.float().numpy()
        b = np.asarray(b, dtype=np.float32)
        if name == "last_hidden_state":  # pad positions are not compared (HF leaves them arbitrary)
            m = attn.reshape(attn.shape + (1,)).astype(bool)
            diff = float(np.max(np.abs(np.where(m, a - b, 0.0))))
        else:
            diff = float(np.max(np.abs(a - b)))
        log(f"verify {name} {tuple(a.shape)}: max abs diff PyTorch vs Flax = {diff:.3e}")
        worst = max(worst, diff)
    return worst


# ----------------------------------------------------------------------------------------------
# Flax (or a training run, or HF) -> HF
# ----------------------------------------------------------------------------------------------


def _is_orbax_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "_CHECKPOINT_METADATA").is_file() or (p / "_METADATA").is_file()
                           or (p / "manifest.ocdbt").is_file())


def _latest_step_dir(checkpoints: Path) -> Path | None:
    if not checkpoints.is_dir():
        return None
    steps = [c for c in checkpoints.iterdir() if c.is_dir() and c.name.isdigit()]
    return max(steps, key=lambda c: int(c.name)) if steps else None


def _looks_like_params(tree) -> bool:
    if not isinstance(tree, Mapping):
        return False
    root = tree.get("longformer", tree)
    return isinstance(root, Mapping) and "embeddings" in root and "encoder" in root


def find_params_in_tree(tree, source: Any = "checkpoint"):
    """The model params inside a restored train state (breadth-first: the first ``params`` entry)."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            if _looks_like_params(node.get("params")):
                return node["params"]
            if isinstance(node.get("params"), Mapping) and _looks_like_params(node["params"].get("params")):
                return node["params"]["params"]
            queue.extend(v for v in node.values() if isinstance(v, (Mapping, list, tuple)))
        elif isinstance(node, (list, tuple)):
            queue.extend(node)
    if _looks_like_params(tree):
        return tree
    raise ConversionError(
        f"{source}: no model params found (looked for a 'params' entry holding 'longformer' / 'embeddings' "
        "and 'encoder')."
    )


def _find_run_config(candidates: list[Path]) -> Path | None:
    """An HF model config.json beside a training checkpoint (the run's own config.json is not one)."""
    for d in candidates:
        for name in (CONFIG_FILE, "model/config.json", "hf/config.json"):
            f = d / name
            if f.is_file():
                try:
                    with open(f) as fh:
                        c = json.load(fh)
                except (json.JSONDecodeError, OSError):
                    continue
                if isinstance(c, dict) and c.get("model_type") in ("longformer", "roberta"):
                    return f
    return None


def _find_train_config(candidates: list[Path]) -> tuple[Path, dict] | None:
    """The pretraining program's own config.json (TrainConfig fields, no model_type)."""
    for d in candidates:
        f = d / CONFIG_FILE
        if f.is_file():
            try:
                c = json.loads(f.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            if isinstance(c, dict) and "model_type" not in c and "num_hidden_layers" in c:
                return f, c
    return None


def _model_config_from_train_config(train_cfg: Mapping[str, Any], params, source: Path) -> dict[str, Any]:
    """An HF config dict for the model of a pretraining run, from its TrainConfig and the params.

    A run started from ``init`` uses that model's config.json; a fresh run's sizes come from the
    TrainConfig fields, the vocabulary and position-table sizes from the params themselves.
    """
    init = train_cfg.get("init")
    if init and Path(init).is_dir() and (Path(init) / CONFIG_FILE).is_file():
        d = read_config_dict(init)
    else:
        if init:
            raise ConversionError(
                f"{source}: the run started from {init!r}, which is not a local directory here; pass "
                "--config with that model's config.json.")
        root = params.get("longformer", params)
        emb = root["embeddings"]
        vocab, hidden = np.shape(emb["word_embeddings"]["embedding"])
        max_pos = np.shape(emb["position_embeddings"]["embedding"])[0]
        type_vocab = np.shape(emb["token_type_embeddings"]["embedding"])[0]
        d = {
            "model_type": "longformer", "vocab_size": int(vocab), "hidden_size": int(hidden),
            "max_position_embeddings": int(max_pos), "type_vocab_size": int(type_vocab),
            "num_hidden_layers": train_cfg["num_hidden_layers"],
            "num_attention_heads": train_cfg["num_attention_heads"],
            "intermediate_size": train_cfg["intermediate_size"],
            "attention_window": train_cfg["attention_window"],
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "sep_token_id": 2,
        }
        tok_dir = source.parent / "tokenizer"
        if (tok_dir / "tokenizer_config.json").is_file() or (tok_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
            for name in ("pad", "bos", "eos", "sep"):
                tid = getattr(tok, f"{name}_token_id", None)
                if tid is not None:
                    d[f"{name}_token_id"] = int(tid)
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if k in train_cfg:
            d[k] = train_cfg[k]
    return d


def _load_train_checkpoint(path: Path, config_path: str | os.PathLike | None):
    """(config, task, params, tokenizer_dir) from a run dir, its checkpoints/ dir, or a step dir."""
    candidates = []
    step_dir = None
    if (path / "checkpoints").is_dir():
        step_dir = _latest_step_dir(path / "checkpoints")
        candidates = [path]
    elif path.name == "checkpoints" or _latest_step_dir(path) is not None:
        step_dir = _latest_step_dir(path)
        candidates = [path, path.parent]
    else:
        step_dir = path
        candidates = [path, path.parent, path.parent.parent]
    if step_dir is None:
        raise ConversionError(f"{path}: no checkpoint steps found under {path / 'checkpoints'}.")
    # The Orbax items of a step: the step dir itself or a sub-item (e.g. state/, params/).
    items = [step_dir] if _is_orbax_dir(step_dir) and (step_dir / "_METADATA").is_file() else []
    for name in ("params", "state", "train_state", "default"):
        if _is_orbax_dir(step_dir / name):
            items.append(step_dir / name)
    items += [c for c in sorted(step_dir.iterdir()) if c.is_dir() and _is_orbax_dir(c) and c not in items]
    if not items:
        raise ConversionError(f"{step_dir}: no Orbax checkpoint found (no _METADATA file).")
    params = None
    errors = []
    for item in items:
        try:
            tree = restore_orbax_tree(item)
            params = find_params_in_tree(tree, item)
            break
        except ConversionError as e:
            errors.append(str(e))
    if params is None:
        raise ConversionError(f"{step_dir}: could not read model params: " + " | ".join(errors))
    train_cfg = _find_train_config([step_dir, *candidates])
    if config_path is None:
        config_path = _find_run_config([step_dir, *candidates])
    if config_path is not None:
        config_path = Path(config_path)
        cdict = read_config_dict(config_path.parent) if config_path.name == CONFIG_FILE else json.loads(
            config_path.read_text())
    elif train_cfg is not None:
        config_path, tc = train_cfg
        cdict = _model_config_from_train_config(tc, params, config_path)
    else:
        raise ConversionError(
            f"{path}: no model config found beside the checkpoint (looked in "
            f"{', '.join(str(c) for c in [step_dir, *candidates])}); pass --config PATH/config.json.")
    config = config_from_dict(cdict, config_path, scan_layers=_is_scanned(params))
    task = "masked-lm" if "lm_head" in params else "base"
    tok_candidates = [step_dir, *candidates, config_path.parent]
    tok_candidates += [c / sub for c in candidates for sub in ("model", "tokenizer", "hf")]
    if train_cfg is not None:
        tok_candidates += [Path(p) for p in (train_cfg[1].get("tokenizer"), train_cfg[1].get("init")) if p]
    tok_dir = next((c for c in tok_candidates if any((c / n).is_file() for n in TOKENIZER_FILES)), None)
    return config, task, params, tok_dir


def load_any_params(src: str | os.PathLike, *, config_path: str | os.PathLike | None = None,
                    task: str | None = None):
    """(config, task, params, tokenizer_dir) from any checkpoint this project reads.

    A Flax checkpoint dir, a pretraining run dir (``RUN_DIR/checkpoints/<step>/``), a ``checkpoints``
    dir, one step dir, or an HF directory / hub id.
    """
    p = Path(src).expanduser()
    if is_flax_checkpoint(p):
        config, stored, params = load_flax_checkpoint(p)
        tok = p
    elif p.is_dir() and not any((p / n).is_file() for n in (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE,
                                                               BIN_INDEX)) and (
            (p / "checkpoints").is_dir() or _latest_step_dir(p) is not None or _is_orbax_dir(p)
            or any(_is_orbax_dir(c) for c in p.iterdir() if c.is_dir())):
        config, stored, params, tok = _load_train_checkpoint(p, config_path)
    else:
        src_dir = resolve_source(src)
        config, stored, params, _ = params_from_hf_dir(src_dir, task)
        tok = src_dir
    if task is not None and check_task(task) != stored:  # e.g. masked-lm -> base: keep the encoder
        state = _hf().state_dict_from_params(params, config, stored)
        if task == "base" and not any(".pooler." in k or k.startswith("pooler.") for k in state):
            config = config.replace(extra={**config.extra, "add_pooling_layer": False})
        try:
            params = _hf().params_from_state_dict(state, config.replace(scan_layers=False), task,
                                                  allow_new_head=False, source=f"{src} ({stored})")
        except ValueError as e:
            raise ConversionError(f"cannot turn the {stored} checkpoint {src} into {task}: {e}") from e
        config = config.replace(scan_layers=False)
        stored = task
    return config, stored, params, tok


def write_hf_dir(directory: Path, config, params, task: str) -> None:
    """Writes config.json + model.safetensors of `params` into `directory` (``hf.save_pretrained``)."""
    import jax

    if getattr(config, "scan_layers", False) != _is_scanned(params):
        config = config.replace(scan_layers=_is_scanned(params))
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    _hf().save_pretrained(str(directory), model_for_task(config, task), host)


def flax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, config_path=None, task: str | None = None,
               overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Any params this project produces -> an HF directory (config.json, model.safetensors, tokenizer)."""
    check_destination(dst, overwrite=overwrite)
    config, task, params, tok_dir = load_any_params(src, config_path=config_path, task=task)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        write_hf_dir(tmp, config, params, task)
        copied = copy_tokenizer_files(tok_dir, tmp)
    log(f"wrote HF checkpoint {dst} (task {task}, architectures {TASK_TO_ARCHITECTURE[task]})")
    log(tokenizer_note(src, copied))
    return {"task": task, "dst": str(dst), "tokenizer_files": copied}


# ----------------------------------------------------------------------------------------------
# RoBERTa -> long Longformer
# ----------------------------------------------------------------------------------------------

_ROBERTA_DROP_CONFIG = (
    "position_embedding_type", "use_cache", "is_decoder", "add_cross_attention", "architectures",
    "model_type", "_name_or_path", "transformers_version", "max_position_embeddings",
    "cross_attention_hidden_size",
    "is_encoder_decoder", "chunk_size_feed_forward", "_attn_implementation", "auto_map",
)


def _config_as_dict(config) -> dict[str, Any]:
    if config is None:
        raise ConversionError("a RoBERTa state dict needs its config (a dict or a transformers config).")
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        return read_config_dict(p if p.is_dir() else p.parent)
    raise ConversionError(f"unsupported config of type {type(config).__name__}; give a dict or a config.")


def _check_roberta_config(cfg: Mapping[str, Any], source: Any) -> None:
    model_type = cfg.get("model_type")
    if model_type not in ROBERTA_MODEL_TYPES:
        extra = ""
        if model_type == "longformer":
            extra = " It is already a Longformer: use convert.hf_to_flax (or load it directly)."
        elif model_type == "bert":
            extra = (" BERT differs from RoBERTa (position ids from 0, no padding offset, a [CLS]/[SEP] "
                     "vocabulary), so its weights do not carry over.")
        raise ConversionError(
            f"{source} has model_type {model_type!r} in config.json; expected a RoBERTa checkpoint "
            f"({' or '.join(repr(t) for t in ROBERTA_MODEL_TYPES)}).{extra}"
        )
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(
            f"{source}: position_embedding_type {cfg.get('position_embedding_type')!r} is not supported; "
            "only absolute position embeddings can be extended."
        )


def _expected_shapes(cfg: Mapping[str, Any], max_pos: int) -> dict[str, tuple[int, ...]]:
    h = int(cfg["hidden_size"])
    f = int(cfg["intermediate_size"])
    v = int(cfg["vocab_size"])
    shapes = {
        "longformer.embeddings.word_embeddings.weight": (v, h),
        "longformer.embeddings.position_embeddings.weight": (max_pos, h),
        "longformer.embeddings.token_type_embeddings.weight": (int(cfg.get("type_vocab_size", 1)), h),
        "longformer.embeddings.LayerNorm.weight": (h,),
        "longformer.embeddings.LayerNorm.bias": (h,),
    }
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"longformer.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.self.{name}.weight"] = (h, h)
            shapes[f"{p}attention.self.{name}.bias"] = (h,)
        shapes.update({
            f"{p}attention.output.dense.weight": (h, h), f"{p}attention.output.dense.bias": (h,),
            f"{p}attention.output.LayerNorm.weight": (h,), f"{p}attention.output.LayerNorm.bias": (h,),
            f"{p}intermediate.dense.weight": (f, h), f"{p}intermediate.dense.bias": (f,),
            f"{p}output.dense.weight": (h, f), f"{p}output.dense.bias": (h,),
            f"{p}output.LayerNorm.weight": (h,), f"{p}output.LayerNorm.bias": (h,),
        })
    return shapes


def _rename_roberta_key(key: str) -> str | None:
    if key.endswith("position_ids") or key.endswith("embeddings.token_type_ids"):
        return None  # buffers
    if key.startswith("roberta."):
        return "longformer." + key[len("roberta."):]
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        return "longformer." + key
    return key  # heads: lm_head.*, classifier.*, qa_outputs.*


def extend_position_embeddings(old_PxH: np.ndarray, new_rows: int, pad_token_id: int = 1) -> np.ndarray:
    """RoBERTa position table -> `new_rows` rows: rows 0..pad kept, then the rows after the pad row
    (the positions real tokens use) copied in repeats until the table is full."""
    old_rows = old_PxH.shape[0]
    start = pad_token_id + 1
    if old_rows <= start:
        raise ConversionError(f"position table has {old_rows} rows; needs more than {start}.")
    period = old_rows - start
    src = start + (np.arange(new_rows - start) % period)
    return np.concatenate([old_PxH[:start], old_PxH[src]], axis=0).astype(old_PxH.dtype)


def roberta_to_longformer(roberta, max_length: int = 4096, attention_window: int | list[int] = 128, *,
                          config=None, max_position_embeddings: int | None = None,
                          source: Any = None) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """A long Longformer from a RoBERTa checkpoint, made the way the seed model was.

    `roberta`: a directory (or hub id) with config.json and weights, or a state dict (then `config`,
    the RoBERTa config as a dict / transformers config, is required). Keys with the ``roberta.``
    prefix, bare ``RobertaModel`` keys and the heads (``lm_head``, ``classifier``, ``qa_outputs``)
    are handled; ``*position_ids`` buffers dropped; a tied ``lm_head.decoder`` is left out.

    Position embeddings: rows 0..pad kept, RoBERTa's rows pad+1.. (the positions real tokens use)
    copied in repeats to fill the new table. ``max_position_embeddings`` defaults to
    ``max_length + pad_token_id + 2`` (4099 for 4096 with RoBERTa's pad id 1, as in the seed
    checkpoint): ``max_length + pad_token_id + 1`` rows are needed (a token at position p uses row
    pad + 1 + p), the extra row keeps the seed's shape. ``query_global/key_global/value_global`` are
    copies of ``query/key/value``.

    Returns ``(longformer_config_dict, longformer_state_dict, task)``.
    """
    if isinstance(roberta, Mapping):
        cfg = _config_as_dict(config)
        state = dict(roberta)
        source = source or "the RoBERTa state dict"
    else:
        src_dir = resolve_source(roberta)
        cfg = read_config_dict(src_dir) if config is None else _config_as_dict(config)
        source = source or (src_dir / CONFIG_FILE)
        _check_roberta_config(cfg, source)
        state = read_state_dict(src_dir)
        source = ", ".join(str(f) for f in find_weight_files(src_dir))
    if isinstance(roberta, Mapping):
        _check_roberta_config(cfg, source)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings"):
        if key not in cfg:
            raise ConversionError(f"{source}: config has no {key!r}.")
    n_layers = int(cfg["num_hidden_layers"])
    windows = [attention_window] * n_layers if isinstance(attention_window, int) else list(attention_window)
    if len(windows) != n_layers:
        raise ConversionError(
            f"attention_window has {len(windows)} entries for {n_layers} layers; "
            "give one int or one per layer.")
    for w in windows:
        if not isinstance(w, (int, np.integer)) or w <= 0 or w % 2:
            raise ConversionError(
                f"attention_window {w} must be a positive even integer (the full window: 2 x one side).")
    if max_length <= 0:
        raise ConversionError(f"max_length {max_length} must be positive.")
    pad = int(cfg.get("pad_token_id", 1))
    if max_position_embeddings is None:
        max_position_embeddings = max_length + pad + 2
    if max_position_embeddings < max_length + pad + 1:
        raise ConversionError(
            f"max_position_embeddings {max_position_embeddings} is too small for max_length {max_length}: "
            f"needs at least max_length + pad_token_id + 1 = {max_length + pad + 1}.")

    renamed: dict[str, np.ndarray] = {}
    for key, value in state.items():
        new = _rename_roberta_key(key)
        if new is not None:
            renamed[new] = np.asarray(value)
    unknown = sorted(k for k in renamed if not k.startswith(("longformer.", "lm_head.", "classifier.",
                                                             "qa_outputs.")))
    if unknown:
        raise ConversionError(f"{source}: unexpected keys for a RoBERTa checkpoint: {', '.join(unknown[:8])}"
                              + (" ..." if len(unknown) > 8 else ""))
    old_max = int(cfg["max_position_embeddings"])
    expected = _expected_shapes(cfg, old_max)
    missing = [k for k in expected if k not in renamed]
    if missing:
        shown = ", ".join(k.replace("longformer.", "roberta.", 1) for k in missing[:6])
        more = " ..." if len(missing) > 6 else ""
        raise ConversionError(f"{source}: missing RoBERTa weights: {shown}{more}")
    for k, shape in expected.items():
        if tuple(renamed[k].shape) != shape:
            raise ConversionError(
                f"{source}: {k.replace('longformer.', 'roberta.', 1)} has shape {tuple(renamed[k].shape)}, "
                f"expected {shape} from config.json (hidden_size {cfg['hidden_size']}, intermediate_size "
                f"{cfg['intermediate_size']}, vocab_size {cfg['vocab_size']}, "
                f"max_position_embeddings {old_max})."
            )

    out = dict(renamed)
    out["longformer.embeddings.position_embeddings.weight"] = extend_position_embeddings(
        renamed["longformer.embeddings.position_embeddings.weight"], max_position_embeddings, pad)
    for i in range(n_layers):
        p = f"longformer.encoder.layer.{i}.attention.self."
        for name in ("query", "key", "value"):
            for part in ("weight", "bias"):
                out[f"{p}{name}_global.{part}"] = renamed[f"{p}{name}.{part}"].copy()

    task = infer_task(cfg, renamed, source)
    if task not in ("base", "multiple-choice"):  # these Longformer heads are built without a pooler
        for k in [k for k in out if k.startswith("longformer.pooler.")]:
            del out[k]  # (roberta-base ships pooler weights that its MLM head never used)
    if task == "masked-lm":
        emb = out["longformer.embeddings.word_embeddings.weight"]
        dec = out.pop("lm_head.decoder.weight", None)
        if dec is not None and (dec.shape != emb.shape or not np.array_equal(dec, emb)):
            raise ConversionError(
                f"{source}: lm_head.decoder.weight differs from the word embeddings; a Longformer masked-LM "
                "ties them, so an untied RoBERTa LM head cannot be carried over.")
        bias = out.get("lm_head.bias", out.get("lm_head.decoder.bias"))
        if bias is None:
            raise ConversionError(f"{source}: missing lm_head.bias for the masked-LM head.")
        out["lm_head.bias"] = bias
        out.pop("lm_head.decoder.bias", None)
        for k in ("lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
                  "lm_head.layer_norm.bias"):
            if k not in out:
                raise ConversionError(f"{source}: missing {k} for the masked-LM head.")

    lf_cfg = {k: v for k, v in cfg.items() if k not in _ROBERTA_DROP_CONFIG}
    lf_cfg.update({
        "model_type": "longformer",
        "architectures": [TASK_TO_ARCHITECTURE[task]],
        "attention_window": [int(w) for w in windows],
        "max_position_embeddings": int(max_position_embeddings),
        "sep_token_id": int(cfg.get("sep_token_id", cfg.get("eos_token_id", 2))),
        "pad_token_id": pad,
        "bos_token_id": int(cfg.get("bos_token_id", 0)),
        "eos_token_id": int(cfg.get("eos_token_id", 2)),
        "type_vocab_size": int(cfg.get("type_vocab_size", 1)),
    })
    return lf_cfg, out, task


def _save_long_tokenizer(src_dir: Path | None, dst: Path, max_length: int) -> list[str]:
    """Tokenizer of `src_dir` with model_max_length raised to `max_length`, saved into `dst`."""
    if src_dir is None or not any((src_dir / n).is_file() for n in TOKENIZER_FILES):
        return []
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src_dir), model_max_length=max_length,
                                            trust_remote_code=False)
    except Exception as e:
        raise ConversionError(
            f"{src_dir}: tokenizer files present but not loadable: {type(e).__name__}: {e}") from e
    tok.model_max_length = max_length
    if hasattr(tok, "init_kwargs"):
        tok.init_kwargs["model_max_length"] = max_length
    names = set(os.listdir(dst))
    tok.save_pretrained(str(dst))
    return sorted(set(os.listdir(dst)) - names)


def convert_roberta_to_longformer(src: str | os.PathLike, dst: str | os.PathLike, *, max_length: int = 4096,
                                  attention_window: int | list[int] = 128, output_format: str = "hf",
                                  max_position_embeddings: int | None = None, overwrite: bool = False,
                                  log: Callable[[str], None] = print) -> dict:
    """RoBERTa dir/hub id -> long Longformer dir: HF files (`hf`), a Flax checkpoint (`flax`) or both."""
    if output_format not in ("hf", "flax", "both"):
        raise ConversionError(f"format {output_format!r}: expected 'hf', 'flax' or 'both'.")
    check_destination(dst, overwrite=overwrite)
    src_dir = resolve_source(src)
    lf_cfg, state, task = roberta_to_longformer(src_dir, max_length, attention_window,
                                                max_position_embeddings=max_position_embeddings)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        tok_files = _save_long_tokenizer(src_dir, tmp, max_length)
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(lf_cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        if output_format in ("hf", "both"):
            write_safetensors(state, tmp / SAFETENSORS_FILE)
        if output_format in ("flax", "both"):
            config = config_from_dict(lf_cfg)
            params = _hf().params_from_state_dict(state, config, task)
            _save_params_orbax(tmp / PARAMS_DIR, params)
            with open(tmp / FORMAT_FILE, "w") as f:
                json.dump({"format": FORMAT_NAME, "task": task, "version": FORMAT_VERSION}, f, indent=2)
                f.write("\n")
    log(f"wrote {output_format} Longformer {dst}: task {task}, max_length {max_length}, "
        f"max_position_embeddings {lf_cfg['max_position_embeddings']}, attention_window "
        f"{sorted(set(lf_cfg['attention_window']))}")
    log(f"tokenizer saved with model_max_length {max_length}: {', '.join(tok_files)}" if tok_files
        else tokenizer_note(src_dir, []))
    return {"task": task, "config": lf_cfg, "tokenizer_files": tok_files}


# ----------------------------------------------------------------------------------------------
# Command-line plumbing shared by the convert/ programs
# ----------------------------------------------------------------------------------------------


def run_command(fn: Callable[[], Any]) -> int:
    """Runs a command body; a user error becomes one `error: ...` line on stderr and exit code 1."""
    import sys

    try:
        fn()
    except (ValueError, OSError) as e:  # ConversionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0
