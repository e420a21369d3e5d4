"""RoBERTa -> long Longformer: the one home of the transform that made the seed checkpoint.

``roberta_to_longformer`` turns a RoBERTa state dict and config into a Longformer one: keys renamed,
the position table extended by copying RoBERTa's rows in repeats (``extend_position_embeddings``),
``query/key/value_global`` made as copies of ``query/key/value``, the attention window set on every
layer. A Longformer given instead is made longer the same way: its position rows copied in repeats,
everything else (its global projections, its windows unless others are given) kept.
``convert_roberta_to_longformer`` reads a RoBERTa directory (or hub id) and writes the long model's
directory: HF files, a Flax checkpoint, or both, with the tokenizer's ``model_max_length`` raised to
the new length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from longformer_jax.config import ROBERTA_MODEL_TYPES
from longformer_jax.pretrained import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    TOKENIZER_FILES,
    ConversionError,
    atomic_output_dir,
    check_destination,
    config_from_dict,
    find_weight_files,
    read_config_dict,
    read_state_dict,
    resolve_source,
    tokenizer_note,
    write_flax_params,
    write_safetensors,
)
from longformer_jax.state_dict import params_from_state_dict, state_dict_shapes
from longformer_jax.tasks import TASKS, infer_task

# RoBERTa config.json keys a Longformer config does not carry over.
_ROBERTA_DROP_CONFIG = (
    "position_embedding_type",
    "use_cache",
    "is_decoder",
    "add_cross_attention",
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "max_position_embeddings",
    "cross_attention_hidden_size",
    "is_encoder_decoder",
    "chunk_size_feed_forward",
    "_attn_implementation",
    "auto_map",
)
_REQUIRED_CONFIG = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)
_HEADS = ("lm_head.", "classifier.", "qa_outputs.")


# ---------------------------------------------------------------------------------------- reading
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
    if model_type not in (*ROBERTA_MODEL_TYPES, "longformer"):
        extra = ""
        if model_type == "bert":
            extra = (
                " BERT differs from RoBERTa (position ids from 0, no padding offset, a [CLS]/[SEP] "
                "vocabulary), so its weights do not carry over."
            )
        raise ConversionError(
            f"{source} has model_type {model_type!r} in config.json; expected a RoBERTa checkpoint "
            f"({' or '.join(repr(t) for t in ROBERTA_MODEL_TYPES)}), or a Longformer to make longer.{extra}"
        )
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(
            f"{source}: position_embedding_type {cfg.get('position_embedding_type')!r} is not supported; "
            "only absolute position embeddings can be extended."
        )
    for key in _REQUIRED_CONFIG:
        if key not in cfg:
            raise ConversionError(f"{source}: config has no {key!r}.")


def _read_roberta(roberta, config, source) -> tuple[dict[str, Any], Mapping[str, Any], Any]:
    """(config dict, state dict, source name) of a state dict + config, or of a directory / hub id."""
    if isinstance(roberta, Mapping):
        cfg = _config_as_dict(config)
        source = source or "the RoBERTa state dict"
        _check_roberta_config(cfg, source)
        return cfg, roberta, source
    src_dir = resolve_source(roberta)
    cfg = read_config_dict(src_dir) if config is None else _config_as_dict(config)
    _check_roberta_config(cfg, source or (src_dir / CONFIG_FILE))
    state = read_state_dict(src_dir)
    return cfg, state, source or ", ".join(str(f) for f in find_weight_files(src_dir))


def _rename_roberta_key(key: str) -> str | None:
    if key.endswith("position_ids") or key.endswith("embeddings.token_type_ids"):
        return None  # buffers
    if key.startswith("roberta."):
        return "longformer." + key[len("roberta.") :]
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        return "longformer." + key
    return key  # heads: lm_head.*, classifier.*, qa_outputs.*


def _renamed(state: Mapping[str, Any], source: Any) -> dict[str, np.ndarray]:
    out = {new: np.asarray(v) for k, v in state.items() if (new := _rename_roberta_key(k)) is not None}
    unknown = sorted(k for k in out if not k.startswith(("longformer.", *_HEADS)))
    if unknown:
        raise ConversionError(
            f"{source}: unexpected keys for a RoBERTa checkpoint: {', '.join(unknown[:8])}"
            + (" ..." if len(unknown) > 8 else "")
        )
    return out


# ---------------------------------------------------------------------------------------- checks
def _windows(attention_window: int | list[int], n_layers: int) -> list[int]:
    windows = [attention_window] * n_layers if isinstance(attention_window, int) else list(attention_window)
    if len(windows) != n_layers:
        raise ConversionError(
            f"attention_window has {len(windows)} entries for {n_layers} layers; give one int or one per layer."
        )
    for w in windows:
        if not isinstance(w, (int, np.integer)) or w <= 0 or w % 2:
            raise ConversionError(
                f"attention_window {w} must be a positive even integer (the full window: 2 x one side)."
            )
    return [int(w) for w in windows]


def _position_rows(max_length: int, max_position_embeddings: int | None, pad: int) -> int:
    if max_length <= 0:
        raise ConversionError(f"max_length {max_length} must be positive.")
    if max_position_embeddings is None:
        max_position_embeddings = max_length + pad + 2
    if max_position_embeddings < max_length + pad + 1:
        raise ConversionError(
            f"max_position_embeddings {max_position_embeddings} is too small for max_length {max_length}: "
            f"needs at least max_length + pad_token_id + 1 = {max_length + pad + 1}."
        )
    return int(max_position_embeddings)


def _check_shapes(
    renamed: Mapping[str, np.ndarray], cfg: Mapping[str, Any], lf_cfg: Mapping[str, Any], source: Any
) -> None:
    """Every encoder tensor present with the shape the model itself has for RoBERTa's config (its
    abstract init); the global projections, which RoBERTa lacks, are made later."""
    old_max = int(cfg["max_position_embeddings"])
    # The smallest window: shapes do not depend on it, and the init's input must fit RoBERTa's positions.
    config = config_from_dict({**lf_cfg, "max_position_embeddings": old_max, "attention_window": 2}, source)
    expected = {
        k: s
        for k, s in state_dict_shapes(config, "masked-lm").items()
        if k.startswith("longformer.") and "_global." not in k
    }
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


def _tie_lm_head(out: dict[str, np.ndarray], source: Any) -> None:
    """A masked-LM head in the Longformer layout: decoder tied to the word embeddings, one bias."""
    emb = out["longformer.embeddings.word_embeddings.weight"]
    dec = out.pop("lm_head.decoder.weight", None)
    if dec is not None and (dec.shape != emb.shape or not np.array_equal(dec, emb)):
        raise ConversionError(
            f"{source}: lm_head.decoder.weight differs from the word embeddings; a Longformer masked-LM "
            "ties them, so an untied RoBERTa LM head cannot be carried over."
        )
    bias = out.get("lm_head.bias", out.get("lm_head.decoder.bias"))
    if bias is None:
        raise ConversionError(f"{source}: missing lm_head.bias for the masked-LM head.")
    out["lm_head.bias"] = bias
    out.pop("lm_head.decoder.bias", None)
    for k in ("lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias"):
        if k not in out:
            raise ConversionError(f"{source}: missing {k} for the masked-LM head.")


# ---------------------------------------------------------------------------------------- the transform
def extend_position_embeddings(old_PxH: np.ndarray, new_rows: int, pad_token_id: int = 1) -> np.ndarray:
    """RoBERTa position table -> ``new_rows`` rows: rows 0..pad kept, then the rows after the pad row
    (the positions real tokens use) copied in repeats until the table is full."""
    old_rows = old_PxH.shape[0]
    start = pad_token_id + 1
    if old_rows <= start:
        raise ConversionError(f"position table has {old_rows} rows; needs more than {start}.")
    period = old_rows - start
    src = start + (np.arange(new_rows - start) % period)
    return np.concatenate([old_PxH[:start], old_PxH[src]], axis=0).astype(old_PxH.dtype)


def _longformer_config(cfg: Mapping[str, Any], task: str, windows: list[int], max_pos: int) -> dict[str, Any]:
    lf_cfg = {k: v for k, v in cfg.items() if k not in _ROBERTA_DROP_CONFIG}
    lf_cfg.update(
        {
            "model_type": "longformer",
            "architectures": [TASKS[task].hf_architecture],
            "attention_window": windows,
            "max_position_embeddings": max_pos,
            "sep_token_id": int(cfg.get("sep_token_id", cfg.get("eos_token_id", 2))),
            "pad_token_id": int(cfg.get("pad_token_id", 1)),
            "bos_token_id": int(cfg.get("bos_token_id", 0)),
            "eos_token_id": int(cfg.get("eos_token_id", 2)),
            "type_vocab_size": int(cfg.get("type_vocab_size", 1)),
        }
    )
    return lf_cfg


def roberta_to_longformer(
    roberta,
    max_length: int = 4096,
    attention_window: int | list[int] | None = None,
    *,
    config=None,
    max_position_embeddings: int | None = None,
    source: Any = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """A long Longformer from a RoBERTa checkpoint, made the way the seed model was.

    ``roberta``: a directory (or hub id) with config.json and weights, or a state dict (then ``config``,
    the RoBERTa config as a dict / transformers config, is required). Keys with the ``roberta.``
    prefix, bare ``RobertaModel`` keys and the heads (``lm_head``, ``classifier``, ``qa_outputs``)
    are handled; ``*position_ids`` buffers dropped; a tied ``lm_head.decoder`` is left out.

    Position embeddings: rows 0..pad kept, RoBERTa's rows pad+1.. (the positions real tokens use)
    copied in repeats to fill the new table. ``max_position_embeddings`` defaults to
    ``max_length + pad_token_id + 2`` (4099 for 4096 with RoBERTa's pad id 1, as in the seed
    checkpoint): ``max_length + pad_token_id + 1`` rows are needed (a token at position p uses row
    pad + 1 + p), the extra row keeps the seed's shape. ``query_global/key_global/value_global`` are
    copies of ``query/key/value``. ``attention_window``: one full window or one per layer; None: 128.

    A Longformer (``model_type`` "longformer") is made longer the same way: its position rows
    (pad+1.., those real tokens use) copied in repeats to the new table, its global projections kept
    (made as copies only where it has none), its own windows unless ``attention_window`` is given.

    Returns ``(longformer_config_dict, longformer_state_dict, task)``.
    """
    cfg, state, source = _read_roberta(roberta, config, source)
    if attention_window is None:
        attention_window = cfg["attention_window"] if cfg.get("model_type") == "longformer" else 128
    windows = _windows(attention_window, int(cfg["num_hidden_layers"]))
    pad = int(cfg.get("pad_token_id", 1))
    max_pos = _position_rows(max_length, max_position_embeddings, pad)
    renamed = _renamed(state, source)
    task = infer_task(cfg, renamed, source)
    lf_cfg = _longformer_config(cfg, task, windows, max_pos)
    _check_shapes(renamed, cfg, lf_cfg, source)

    out = dict(renamed)
    out["longformer.embeddings.position_embeddings.weight"] = extend_position_embeddings(
        renamed["longformer.embeddings.position_embeddings.weight"], max_pos, pad
    )
    for i in range(len(windows)):
        p = f"longformer.encoder.layer.{i}.attention.self."
        for name in ("query", "key", "value"):
            for part in ("weight", "bias"):
                out.setdefault(f"{p}{name}_global.{part}", renamed[f"{p}{name}.{part}"].copy())
    if task not in ("base", "multiple-choice"):  # these Longformer heads are built without a pooler
        for k in [k for k in out if k.startswith("longformer.pooler.")]:
            del out[k]  # (roberta-base ships pooler weights that its MLM head never used)
    if task == "masked-lm":
        _tie_lm_head(out, source)
    return lf_cfg, out, task


# ---------------------------------------------------------------------------------------- the directory
def _save_long_tokenizer(src_dir: Path | None, dst: Path, max_length: int) -> list[str]:
    """Tokenizer of ``src_dir`` with model_max_length raised to ``max_length``, saved into ``dst``."""
    if src_dir is None or not any((src_dir / n).is_file() for n in TOKENIZER_FILES):
        return []
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src_dir), model_max_length=max_length, trust_remote_code=False)
    except Exception as e:
        raise ConversionError(f"{src_dir}: tokenizer files present but not loadable: {type(e).__name__}: {e}") from e
    tok.model_max_length = max_length
    if hasattr(tok, "init_kwargs"):
        tok.init_kwargs["model_max_length"] = max_length
    names = set(os.listdir(dst))
    tok.save_pretrained(str(dst))
    return sorted(set(os.listdir(dst)) - names)


def convert_roberta_to_longformer(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    max_length: int = 4096,
    attention_window: int | list[int] | None = None,
    output_format: str = "hf",
    max_position_embeddings: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """RoBERTa (or Longformer) dir/hub id -> long Longformer dir: HF files (``hf``), a Flax checkpoint
    (``flax``) or both."""
    if output_format not in ("hf", "flax", "both"):
        raise ConversionError(f"format {output_format!r}: expected 'hf', 'flax' or 'both'.")
    check_destination(dst, overwrite=overwrite)
    src_dir = resolve_source(src)
    lf_cfg, state, task = roberta_to_longformer(
        src_dir, max_length, attention_window, max_position_embeddings=max_position_embeddings
    )
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        tok_files = _save_long_tokenizer(src_dir, tmp, max_length)
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(lf_cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        if output_format in ("hf", "both"):
            write_safetensors(state, tmp / SAFETENSORS_FILE)
        if output_format in ("flax", "both"):
            params = params_from_state_dict(state, config_from_dict(lf_cfg, tmp / CONFIG_FILE), task)
            write_flax_params(tmp, params, task)
    log(
        f"wrote {output_format} Longformer {dst}: task {task}, max_length {max_length}, "
        f"max_position_embeddings {lf_cfg['max_position_embeddings']}, attention_window "
        f"{sorted(set(lf_cfg['attention_window']))}"
    )
    log(
        f"tokenizer saved with model_max_length {max_length}: {', '.join(tok_files)}"
        if tok_files
        else tokenizer_note(src_dir, [])
    )
    return {"task": task, "config": lf_cfg, "tokenizer_files": tok_files}
