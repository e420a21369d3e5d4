"""Serving an exported model with jax and numpy alone (no Flax, no ``transformers``).

``load_exported(directory)`` reads what ``longformer_jax.export`` wrote (``manifest.json``, one StableHLO
program per length bucket, ``model.safetensors``, optionally ONNX files and ``tokenizer.json``) and returns an
:class:`ExportedModel`: a callable on numpy ``input_ids`` / ``attention_mask`` / ``global_attention_mask`` that
returns the task's outputs as numpy arrays. It checks the files against the manifest's sha256, picks the
smallest bucket that holds the rows, pads them (pad id, attention mask 0), places the task's automatic global
attention when no global mask is given (``longformer_jax.global_rules``), and refuses a row longer than the
largest bucket or with more global tokens than the exported slots ``G`` with a ValueError naming the fix
(the program would return wrong numbers for such a row). Outputs are cut back to the input's length.
``backend="onnx"`` runs the ONNX files in onnxruntime behind the same interface.

``.predict(texts)`` (classification tasks) tokenizes with the exported ``tokenizer.json`` (the ``tokenizers``
library) and lays the text out as the model was fine-tuned (``longformer_jax.text_layout``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from longformer_jax import text_layout
from longformer_jax.global_rules import automatic_global_attention

MANIFEST_FILE = "manifest.json"
FORMAT = "longformer-jax-export"
FORMAT_VERSION = 1
INPUT_NAMES = ("input_ids", "attention_mask", "global_attention_mask")
# Outputs with one value per token (cut back to the input's length) and per sentence block.
PER_TOKEN_TASKS = ("masked-lm", "token-classification", "question-answering", "base")
PER_BLOCK_TASKS = ("sequential-sentence-classification",)
BACKENDS = ("stablehlo", "onnx")


def sha256_of(path: str | Path) -> str:
    """The hex sha256 of a file (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: str | Path, *, check_files: bool = True) -> dict[str, Any]:
    """The manifest of an exported model; with ``check_files``, every file's sha256 checked against it."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(
            f"{directory} holds no {MANIFEST_FILE}; give a directory written by python -m convert.export "
            "(or longformer_jax.export.export_model)."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; this loader "
            f"reads {FORMAT!r} version {FORMAT_VERSION}. Export the model again with this version."
        )
    if check_files:
        for name, digest in manifest["files"].items():
            if not (directory / name).is_file():
                raise ValueError(f"{directory / name} is missing (listed in {path}); export the model again.")
            if sha256_of(directory / name) != digest:
                raise ValueError(
                    f"{directory / name} does not match its sha256 in {path} (corrupted or edited); export the "
                    "model again."
                )
    return manifest


def _as_int32(name: str, x, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iub":
        raise ValueError(f"{name} has dtype {a.dtype}; pass integer token ids and 0/1 masks.")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} but input_ids has shape {shape}; pass one value per token.")
    return a.astype(np.int32)


class _StableHLORunner:
    """The StableHLO programs (``jax.export``), deserialized and jitted once per bucket."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory, self.manifest = directory, manifest
        backend = jax.default_backend()
        platform = {"gpu": "cuda"}.get(backend, backend)
        if platform not in manifest["platforms"]:
            raise ValueError(
                f"the programs in {directory} were lowered for {manifest['platforms']}, not for this host's "
                f"{platform}; export again with --platforms {platform} (or run on one of those platforms)."
            )
        weights = manifest.get("weights")
        self.weights = None
        if weights:
            self.weights = jax.device_put(safetensors.numpy.load_file(str(directory / weights)))
        self._calls: dict[int, Any] = {}

    def __call__(self, length: int, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if length not in self._calls:
            blob = (self.directory / self.manifest["programs"][str(length)]["stablehlo"]).read_bytes()
            exported = jax.export.deserialize(bytearray(blob))
            if self.weights is None:
                self._calls[length] = jax.jit(exported.call)
            else:
                self._calls[length] = jax.jit(lambda *a, _e=exported: _e.call(self.weights, *a))
        return [np.asarray(o) for o in jax.device_get(self._calls[length](*arrays))]


class _OnnxRunner:
    """The ONNX files in onnxruntime (one session per bucket, made on first use)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], threads: int | None):
        try:
            import onnxruntime
        except ImportError as e:
            raise ValueError(
                "backend='onnx' needs onnxruntime: pip install 'longformer-jax[onnx]' (or use backend='stablehlo')."
            ) from e
        if not all("onnx" in p for p in manifest["programs"].values()):
            raise ValueError(f"{directory} holds no ONNX files; export with --onnx, or load with backend='stablehlo'.")
        self.ort, self.directory, self.manifest, self.threads = onnxruntime, directory, manifest, threads
        self._sessions: dict[int, Any] = {}

    def __call__(self, length: int, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if length not in self._sessions:
            options = self.ort.SessionOptions()
            options.log_severity_level = 3  # errors only (not the notes about unused initializers)
            if self.threads:
                options.intra_op_num_threads = self.threads
            path = str(self.directory / self.manifest["programs"][str(length)]["onnx"])
            self._sessions[length] = self.ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return self._sessions[length].run(None, dict(zip(INPUT_NAMES, arrays)))


class ExportedModel:
    """An exported model, ready to run (see the module docstring). Made by :func:`load_exported`.

    Attributes:
        manifest: the manifest (task, labels, buckets, ``num_global_slots``, ...).
        task: the task name; ``labels`` the label names (None where the task has none).
        buckets: the exported lengths, ascending; ``num_global_slots`` the most global tokens a row may hold.
    """

    def __init__(self, directory: str | Path, *, backend: str = "stablehlo", threads: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; expected one of {BACKENDS}.")
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        self.task, self.labels = m["task"], m.get("labels")
        self.buckets = sorted(int(b) for b in m["programs"])
        self.num_global_slots = int(m["num_global_slots"])
        self.output_names = list(m["outputs"])
        self.backend = backend
        if backend == "onnx":
            self._run = _OnnxRunner(self.directory, m, threads)
        else:
            self._run = _StableHLORunner(self.directory, m)
        self._tokenizer = None

    # ------------------------------------------------------------------------------------ arrays
    def _bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(
            f"the input has {length} tokens but the largest exported length is {self.buckets[-1]}; truncate the "
            f"input to {self.buckets[-1]} tokens or export again with a longer bucket (--lengths ...,{length})."
        )

    def prepare(self, input_ids, attention_mask=None, global_attention_mask=None) -> tuple[int, list[np.ndarray]]:
        """(bucket, [input_ids, attention_mask, global_attention_mask] padded to it): the checked program inputs."""
        m = self.manifest
        ids = _as_int32("input_ids", input_ids)
        rank = 3 if self.task == "multiple-choice" else 2
        if ids.ndim != rank:
            what = "(batch, num_choices, length)" if rank == 3 else "(batch, length)"
            raise ValueError(f"input_ids has shape {ids.shape}; a {self.task} model takes {what}.")
        am = np.ones_like(ids) if attention_mask is None else _as_int32("attention_mask", attention_mask, ids.shape)
        if global_attention_mask is None:
            gm = automatic_global_attention(
                m.get("global_attention"),
                ids,
                am,
                sep_token_id=m["sep_token_id"],
                block_size=m.get("sentence_block_size") or 1,
            )
            gm = np.zeros_like(ids) if gm is None else gm
        else:
            gm = _as_int32("global_attention_mask", global_attention_mask, ids.shape)
        if ids.size and (ids.min() < 0 or ids.max() >= m["vocab_size"]):
            bad = int(ids.max() if ids.max() >= m["vocab_size"] else ids.min())
            raise ValueError(
                f"input_ids holds token id {bad}, outside the vocabulary [0, {m['vocab_size']}); was the text "
                "tokenized with this model's tokenizer?"
            )
        counts = ((am != 0) & (gm != 0)).reshape(-1, ids.shape[-1]).sum(-1)
        if counts.size and counts.max() > self.num_global_slots:
            row = int(counts.argmax())
            raise ValueError(
                f"row {row} has {int(counts[row])} global tokens but the model was exported with "
                f"num_global_slots={self.num_global_slots}; give fewer global tokens or export again with "
                f"--num-global-slots {int(counts.max())} or more."
            )
        bucket = self._bucket(ids.shape[-1])
        width = [(0, 0)] * (ids.ndim - 1) + [(0, bucket - ids.shape[-1])]
        return bucket, [
            np.pad(ids, width, constant_values=m["pad_token_id"]),
            np.pad(am, width),
            np.pad(gm, width),
        ]

    def __call__(self, input_ids, attention_mask=None, global_attention_mask=None) -> dict[str, np.ndarray]:
        """The task's outputs (``logits``; ``start_logits`` and ``end_logits`` for question answering) as numpy.

        ``input_ids``: (B, L) int token ids ((B, C, L) for multiple choice), any ``L`` up to the largest bucket;
        ``attention_mask``: 1 keep, 0 pad (all ones when None); ``global_attention_mask``: 1 global (the task's
        automatic global attention when None).
        """
        length = np.shape(input_ids)[-1]
        bucket, arrays = self.prepare(input_ids, attention_mask, global_attention_mask)
        outs = self._run(bucket, arrays)
        if self.task in PER_TOKEN_TASKS:
            outs = [o[:, :length] for o in outs]
        elif self.task in PER_BLOCK_TASKS:
            block = self.manifest["sentence_block_size"]
            outs = [o[:, : -(-length // block)] for o in outs]
        return dict(zip(self.output_names, outs))

    # ------------------------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        """The exported ``tokenizers.Tokenizer``; a ValueError when the export has none."""
        if self._tokenizer is None:
            name = self.manifest.get("tokenizer")
            if not name:
                raise ValueError(
                    f"{self.directory} was exported without a tokenizer, so it cannot read text; call the model on "
                    "token ids, or export again from a source with tokenizer files (tokenizer.json, or vocab.json "
                    "and merges.txt)."
                )
            import tokenizers

            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.directory / name))
        return self._tokenizer

    def predict(self, texts: str | Sequence[Any]) -> Any:
        """Labels of ``texts`` (one text or a list): ``{"label", "scores"}`` per text.

        Document / sequence classification: a text is a string; sequential sentence classification: a list of
        sentences (one block each), with one label and one score dict per sentence.
        """
        if self.task not in text_layout.TEXT_TASKS:
            raise ValueError(
                f"predict(texts) reads text for {', '.join(text_layout.TEXT_TASKS)}; this is a {self.task} model: "
                "call it on token ids."
            )
        single = isinstance(texts, str) or (self.task in PER_BLOCK_TASKS and bool(texts) and isinstance(texts[0], str))
        batch = [texts] if single else list(texts)
        layout = text_layout.TextLayout.from_manifest(self.manifest, largest=self.buckets[-1])
        arrays, owners = layout.encode(self.tokenizer, batch)
        logits = self(**arrays)["logits"]
        names = self.labels or [f"LABEL_{i}" for i in range(logits.shape[-1])]
        out = text_layout.label_predictions(layout, logits, owners, batch, names)
        return out[0] if single else out


def load_exported(directory: str | Path, *, backend: str = "stablehlo", threads: int | None = None) -> ExportedModel:
    """An exported model (``python -m convert.export``), ready to run with jax and numpy alone.

    Args:
        directory: the export directory (``manifest.json`` and the files it lists).
        backend: ``"stablehlo"`` (the ``jax.export`` programs, on this host's platform) or ``"onnx"``
            (the ONNX files in onnxruntime on the CPU; needs the ``onnx`` extra).
        threads: onnxruntime's intra-op threads (None: its default).

    Raises:
        ValueError: a directory that is no export, a file whose sha256 does not match the manifest, programs
            lowered for other platforms, or ONNX asked of an export without ONNX files.
    """
    return ExportedModel(directory, backend=backend, threads=threads)
