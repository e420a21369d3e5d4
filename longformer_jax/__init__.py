"""longformer-jax: the Longformer in JAX/Flax, exact to Hugging Face ``transformers``.

Usage (``lj`` is ``longformer_jax``; docs/usage.md has more)::

    model, params = lj.load_pretrained("kiddothe2b/longformer-base-4096", task="masked-lm")
    out = model.apply({"params": params}, input_ids, attention_mask=am, global_attention_mask=gm)

The names below are imported on first use (PEP 562), so ``lj.load_exported`` (serving an exported model)
runs with jax and numpy alone: Flax and ``transformers`` are imported only by the names that need them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from longformer_jax import startup

startup.import_jax()  # before anything imports JAX: see longformer_jax.startup

__version__ = "0.1.0"

# name -> the module that defines it (a module's own name: the module itself).
_EXPORTS = {
    "attention": "longformer_jax.attention",
    "use_training_xla_flags": "longformer_jax.compile_options",
    "LongformerConfig": "longformer_jax.config",
    "LongformerForDocumentClassification": "longformer_jax.heads",
    "LongformerForMaskedLM": "longformer_jax.heads",
    "LongformerForMultipleChoice": "longformer_jax.heads",
    "LongformerForQuestionAnswering": "longformer_jax.heads",
    "LongformerForSequenceClassification": "longformer_jax.heads",
    "LongformerForSequentialSentenceClassification": "longformer_jax.heads",
    "LongformerForTokenClassification": "longformer_jax.heads",
    "ModelInputs": "longformer_jax.inputs",
    "global_slot_bucket": "longformer_jax.inputs",
    "prepare_inputs": "longformer_jax.inputs",
    "LongformerModel": "longformer_jax.modeling",
    "fill_mask": "longformer_jax.pipeline",
    "load_pretrained": "longformer_jax.pretrained",
    "save_pretrained": "longformer_jax.pretrained",
    "params_from_state_dict": "longformer_jax.state_dict",
    "state_dict_from_params": "longformer_jax.state_dict",
    "TASKS": "longformer_jax.tasks",
    "build_model": "longformer_jax.tasks",
    "init_params": "longformer_jax.tasks",
    "export_model": "longformer_jax.export",
    "load_exported": "longformer_jax.serving",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports the module behind ``name`` (or the submodule ``name``) on first use; the value is kept here."""
    if name not in _EXPORTS:
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'longformer_jax' has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
