"""Serving artifacts: a model as ``jax.export`` programs (StableHLO), optionally ONNX, with a manifest.

:func:`export_model` writes, atomically, into one directory:

- ``model_L{n}.stablehlo``: one serialized ``jax.export`` program per length bucket ``n`` (a multiple of the
  largest window), with a symbolic batch dimension (and a symbolic number of choices for multiple choice), the
  number of global slots ``G`` fixed, lowered for the ``platforms`` asked (cpu, cuda and tpu by default). The
  program takes ``(weights, input_ids, attention_mask, global_attention_mask)`` (int32) and returns the task's
  outputs; the weights are ``model.safetensors`` (flat Flax names), or baked into the programs
  (``embed_weights``);
- ``model_L{n}.onnx`` (``onnx=True``): the same function converted by ``jax2onnx`` (weights inside);
- ``tokenizer.json`` when the source has tokenizer files (``predict(texts)`` needs it);
- ``manifest.json``: task, labels, buckets, ``G``, input names and dtypes, special token ids, the automatic
  global-attention rule, the fine-tuning layout, platforms, the attention implementation, versions and a sha256
  per file.

With ``verify`` (the default) every artifact is loaded with :func:`longformer_jax.serving.load_exported` and run
on this host against the Flax model (StableHLO within 1e-5, ONNX in onnxruntime within 1e-4, max abs) before the
directory is put in place; on a mismatch nothing is written. The loader needs no Flax; this module does.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from longformer_jax import kernels, serving
from longformer_jax.config import LongformerConfig
from longformer_jax.global_rules import TASK_RULES
from longformer_jax.inputs import global_slot_bucket
from longformer_jax.pretrained import ConversionError, atomic_output_dir
from longformer_jax.tasks import automatic_global_attention_mask, config_for_model, task_of_model

DEFAULT_LENGTHS = (512, 1024, 4096)
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOLERANCE = {"stablehlo": 1e-5, "onnx": 1e-4}
# The custom calls of the kernels (``attention_implementation``) and the platform each one runs on. jax.export
# guarantees compatibility only for its stable custom calls: the Triton call of ``pallas-gpu`` is exported with
# that safety check disabled, so its programs run only with a jaxlib whose Triton support reads them.
KERNEL_PLATFORMS = {"splash": ("tpu",), "pallas-gpu": ("cuda",)}
KERNEL_CUSTOM_CALLS = {"pallas-gpu": ("triton_kernel_call",)}


def _outputs(task: str) -> tuple[str, ...]:
    if task == "question-answering":
        return ("start_logits", "end_logits")
    return ("last_hidden_state",) if task == "base" else ("logits",)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def flat_weights(params) -> dict[str, np.ndarray]:
    """The parameters as one flat ``{"a/b/c": array}`` dict (the names in ``model.safetensors``)."""
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}


def program(model, num_global_slots: int) -> Callable:
    """``f(weights, input_ids, attention_mask, global_attention_mask) -> outputs``: what is exported."""
    names = _outputs(task_of_model(model))

    def f(weights, input_ids, attention_mask, global_attention_mask):
        params = flax.traverse_util.unflatten_dict(weights, sep="/")
        out = model.apply(
            {"params": params},
            input_ids,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            num_global_slots=num_global_slots,
        )
        return tuple(getattr(out, n) for n in names)

    return f


def input_shape(task: str, length: int, symbols: Sequence[Any]) -> tuple[Any, ...]:
    """The program's input shape: (batch, length), or (batch, choices, length) for multiple choice."""
    return (symbols[0], symbols[1], length) if task == "multiple-choice" else (symbols[0], length)


# ---------------------------------------------------------------------------------------- checks and defaults
def resolve_implementation(config: LongformerConfig, platforms: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """(the attention implementation traced on this host, the platforms to lower for)."""
    impl = kernels.resolve_implementation(config.attention_implementation, pattern=config.has_attention_pattern)
    allowed = KERNEL_PLATFORMS.get(impl, DEFAULT_PLATFORMS)
    platforms = tuple(platforms) if platforms else allowed
    bad = [p for p in platforms if p not in allowed]
    if bad:
        raise ConversionError(
            f"--platforms {','.join(platforms)}: attention_implementation={impl!r} runs only on "
            f"{', '.join(allowed)}; drop {', '.join(bad)}, or export a model with attention_implementation='blocked' "
            "(plain JAX: every platform)."
        )
    return impl, platforms


def check_lengths(config: LongformerConfig, task: str, lengths: Sequence[int] | None, block: int | None) -> list[int]:
    """The length buckets, sorted: multiples of the largest window (and of the sentence block) within the
    position embeddings; the defaults that fit when None."""
    step = int(np.lcm(config.pad_multiple, block)) if block else config.pad_multiple
    limit = config.max_sequence_length
    if not lengths:
        lengths = [n for n in DEFAULT_LENGTHS if n <= limit] or [limit - limit % step]
    out = sorted({int(n) for n in lengths})
    for n in out:
        if n <= 0 or n % step or n > limit + (-limit) % config.pad_multiple:
            raise ConversionError(
                f"length {n} cannot be a bucket: lengths must be positive multiples of {step} (the largest attention "
                f"window{' and the sentence block' if block else ''}) up to {limit} (max_position_embeddings); "
                f"e.g. --lengths {','.join(str(k) for k in (step, 2 * step) if k <= limit) or step}."
            )
    return out


def default_global_slots(task: str, largest: int, block: int | None, finetuning: dict[str, Any] | None) -> int:
    """``G`` when not given: one for ``<s>``, every block start of the largest bucket for the block layouts,
    64 for a question or a choice, else none."""
    rule = TASK_RULES.get(task)
    layout_blocks = (finetuning or {}).get("layout") == "blocks"
    if rule == "block-starts" or (layout_blocks and block):
        return largest // (block or 128)
    if rule == "first-token":
        return 1
    return global_slot_bucket(64) if rule else 0


# ---------------------------------------------------------------------------------------- writing
def _export_stablehlo(fn, weights, task, length, platforms, impl, embed_weights) -> bytes:
    symbols = jax.export.symbolic_shape("batch, choices")
    spec = jax.ShapeDtypeStruct(input_shape(task, length, symbols), jnp.int32)
    checks = [jax.export.DisabledSafetyCheck.custom_call(c) for c in KERNEL_CUSTOM_CALLS.get(impl, ())]
    if embed_weights:
        consts = jax.tree.map(jnp.asarray, weights)
        exported = jax.export.export(
            jax.jit(lambda a, b, c: fn(consts, a, b, c)), platforms=platforms, disabled_checks=checks
        )(spec, spec, spec)
    else:
        wspec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
        exported = jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=checks)(wspec, spec, spec, spec)
    return bytes(exported.serialize())


def _export_onnx(fn, weights, task, length, names: Sequence[str], path: Path) -> None:
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ConversionError(
            f"--onnx needs jax2onnx and onnx ({e}); pip install 'longformer-jax[onnx]' and jax2onnx (see the Makefile)."
        ) from e
    consts = jax.tree.map(jnp.asarray, weights)
    spec = jax.ShapeDtypeStruct(input_shape(task, length, ("B", "C")), jnp.int32)
    # onnx_ir logs a WARNING per intermediate value of jax2onnx's graph whose type it leaves unset (shape-only
    # values it drops when serializing): not a problem of the model, so only its errors are shown.
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)
    model = to_onnx(
        lambda a, b, c: fn(consts, a, b, c),
        [spec, spec, spec],
        model_name=f"longformer_{task.replace('-', '_')}_L{length}",
        input_names=list(serving.INPUT_NAMES),
        output_names=list(names),
    )
    onnx.save_model(model, str(path))


def _tokenizer_json(tokenizer, out: Path) -> bool:
    """Writes ``out/tokenizer.json`` from a directory of tokenizer files or a transformers tokenizer."""
    if tokenizer is None:
        return False
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if (src / TOKENIZER_FILE).is_file():
            (out / TOKENIZER_FILE).write_bytes((src / TOKENIZER_FILE).read_bytes())
            return True
        if not any((src / n).is_file() for n in ("vocab.json", "tokenizer_config.json", "merges.txt")):
            return False
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(src))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    backend.save(str(out / TOKENIZER_FILE))
    return True


def _manifest(model, lengths, slots, impl, platforms, *, labels, finetuning, embed_weights, onnx, has_tok):
    config = config_for_model(model)
    task = task_of_model(model)
    block = getattr(model, "sentence_block_size", None) or (finetuning or {}).get("block_size")
    programs = {
        str(n): {"stablehlo": f"model_L{n}.stablehlo", **({"onnx": f"model_L{n}.onnx"} if onnx else {})}
        for n in lengths
    }
    return {
        "format": serving.FORMAT,
        "format_version": serving.FORMAT_VERSION,
        "task": task,
        "labels": labels,
        "num_labels": config.num_labels,
        "buckets": list(lengths),
        "num_global_slots": slots,
        "inputs": {
            "names": list(serving.INPUT_NAMES),
            "dtype": "int32",
            "shape": ["batch", "choices", "length"] if task == "multiple-choice" else ["batch", "length"],
        },
        "outputs": list(_outputs(task)),
        "vocab_size": config.vocab_size,
        "pad_token_id": config.pad_token_id,
        "sep_token_id": config.sep_token_id,
        "special_tokens": {"bos": config.bos_token_id, "eos": config.eos_token_id, "pad": config.pad_token_id},
        "global_attention": TASK_RULES.get(task),
        "sentence_block_size": block,
        "finetuning": finetuning,
        "attention_window": list(config.attention_windows),
        "attention_implementation": impl,
        "custom_calls": list(KERNEL_CUSTOM_CALLS.get(impl, ())),
        "platforms": list(platforms),
        "weights": None if embed_weights else WEIGHTS_FILE,
        "programs": programs,
        "tokenizer": TOKENIZER_FILE if has_tok else None,
        "config": config.to_dict(),
        "versions": {n: _version(n) for n in ("longformer-jax", "jax", "jaxlib", "flax", "jax2onnx", "onnx")},
    }


# ---------------------------------------------------------------------------------------- verification
def verification_inputs(task: str, length: int, slots: int, config: LongformerConfig, seed: int = 0):
    """Two rows of ``length`` tokens (the second padded at the end) with three separators (the question-answering
    and multiple-choice rules need them) and at most ``slots`` global tokens: ``<s> q </s></s> context </s>``
    (the question: ``min(slots, 3)`` tokens with ``<s>``), ``<s> context </s></s> c </s>`` for multiple choice;
    without a rule, global attention on the first ``min(slots, 2)`` tokens."""
    rng = np.random.default_rng(seed)
    specials = {config.bos_token_id, config.eos_token_id, config.pad_token_id, config.sep_token_id}
    low = max(specials) + 1
    rows = 4 if task == "multiple-choice" else 2
    ids = rng.integers(low, config.vocab_size, (rows, length)).astype(np.int32)
    am = np.ones_like(ids)
    q = max(1, min(slots, 3))
    for r in range(rows):
        end = length if r < rows // 2 else max(q + 4, length - length // 3)  # the row's real tokens
        first = end - 4 if task == "multiple-choice" else q
        ids[r, 0], ids[r, first], ids[r, first + 1], ids[r, end - 1] = (config.bos_token_id,) + (
            config.sep_token_id,
        ) * 3
        ids[r, end:], am[r, end:] = config.pad_token_id, 0
    gm = None
    if task not in TASK_RULES:
        gm = np.zeros_like(ids)
        gm[:, : min(slots, 2)] = 1
    if task == "multiple-choice":
        return ids.reshape(2, 2, length), am.reshape(2, 2, length), None
    return ids, am, gm


def verify_export(directory: Path, model, params, log: Callable[[str], None] = print) -> dict[str, float]:
    """Runs every artifact in ``directory`` through the loader against the Flax model; returns the max abs
    difference per backend and raises ConversionError when one exceeds its tolerance (:data:`TOLERANCE`)."""
    manifest = serving.read_manifest(directory)
    backends = ["stablehlo"] + (["onnx"] if all("onnx" in p for p in manifest["programs"].values()) else [])
    config, task, slots = model.config, manifest["task"], manifest["num_global_slots"]
    worst = {}
    for backend in backends:
        loaded = serving.load_exported(directory, backend=backend)
        worst[backend] = 0.0
        for length in manifest["buckets"]:
            ids, am, gm = verification_inputs(task, length, slots, config)
            got = loaded(ids, am, gm)
            auto = automatic_global_attention_mask(model, ids, am) if gm is None else gm
            out = model.apply({"params": params}, ids, attention_mask=am, global_attention_mask=auto)
            for name in manifest["outputs"]:
                diff = float(np.max(np.abs(np.asarray(getattr(out, name)) - got[name])))
                worst[backend] = max(worst[backend], diff)
                if not diff <= TOLERANCE[backend]:
                    raise ConversionError(
                        f"verification failed: {backend} {name} at length {length} differs from the Flax model by "
                        f"{diff:.3g} (tolerance {TOLERANCE[backend]:g}); nothing was written. Report this with the "
                        "model's config.json."
                    )
        log(f"verified {backend}: max abs difference {worst[backend]:.3g} (tolerance {TOLERANCE[backend]:g})")
    return worst


# ---------------------------------------------------------------------------------------- the entry point
def export_model(
    model,
    params,
    dst: str | os.PathLike,
    *,
    lengths: Sequence[int] | None = None,
    num_global_slots: int | None = None,
    platforms: Sequence[str] | None = None,
    embed_weights: bool = False,
    onnx: bool = False,
    tokenizer: Any = None,
    labels: Sequence[str] | None = None,
    finetuning: dict[str, Any] | None = None,
    verify: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Writes the serving artifacts of ``model`` with ``params`` to ``dst`` (see the module docstring).

    Args:
        model: a module made by ``build_model`` (its task and head settings go into the manifest).
        params: its parameters.
        dst: the output directory (written atomically; an existing one only with ``overwrite``).
        lengths: the length buckets (multiples of the largest window; of the sentence block too for the block
            heads); 512, 1024 and 4096 where they fit when None.
        num_global_slots: ``G``, the most global tokens a row may hold (:func:`default_global_slots` when None).
        platforms: the platforms to lower for (cpu, cuda, tpu by default; a kernel's own platform with a kernel).
        embed_weights: bake the weights into the programs instead of ``model.safetensors``.
        onnx: also write ONNX files (``jax2onnx``).
        tokenizer: a directory of tokenizer files or a transformers tokenizer (``tokenizer.json`` is written).
        labels: the label names (``id2label`` order).
        finetuning: the fine-tuning settings (``"finetuning"`` in a fine-tuned model's config.json: the layout).
        verify: run every artifact against the Flax model before writing (see the module docstring).
        overwrite: replace an existing ``dst``.
        log: where progress lines go.

    Returns:
        The manifest.
    """
    config, task = model.config, task_of_model(model)
    block = getattr(model, "sentence_block_size", None)
    lengths = check_lengths(config, task, lengths, block)
    if num_global_slots is None:
        num_global_slots = min(
            lengths[-1],
            default_global_slots(task, lengths[-1], block or (finetuning or {}).get("block_size"), finetuning),
        )
    if num_global_slots < 0 or (num_global_slots == 0 and task in TASK_RULES):
        raise ConversionError(
            f"num_global_slots={num_global_slots}: a {task} model places global attention itself "
            f"({TASK_RULES.get(task)}), so it needs at least one slot (--num-global-slots)."
        )
    impl, platforms = resolve_implementation(config, platforms)
    weights = flat_weights(params)
    fn = program(model, num_global_slots)
    with atomic_output_dir(dst, overwrite=overwrite) as out:
        for n in lengths:
            log(f"exporting length {n} (G={num_global_slots}, {impl}) for {', '.join(platforms)}")
            (out / f"model_L{n}.stablehlo").write_bytes(
                _export_stablehlo(fn, weights, task, n, platforms, impl, embed_weights)
            )
            if onnx:
                log(f"converting length {n} to ONNX (jax2onnx)")
                _export_onnx(fn, weights, task, n, _outputs(task), out / f"model_L{n}.onnx")
        if not embed_weights:
            safetensors.numpy.save_file(weights, str(out / WEIGHTS_FILE))
        has_tok = _tokenizer_json(tokenizer, out)
        manifest = _manifest(
            model,
            lengths,
            num_global_slots,
            impl,
            platforms,
            labels=list(labels) if labels else None,
            finetuning=finetuning,
            embed_weights=embed_weights,
            onnx=onnx,
            has_tok=has_tok,
        )
        manifest["files"] = {p.name: serving.sha256_of(p) for p in sorted(out.iterdir()) if p.is_file()}
        (out / serving.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify:
            verify_export(out, model, params, log)
    log(f"wrote {dst}: {task}, lengths {lengths}, {len(manifest['files'])} files")
    return manifest
