"""longformer-jax: the Longformer in JAX/Flax, exact to Hugging Face ``transformers``.

Usage (``lj`` is ``longformer_jax``; docs/usage.md has more)::

    model, params = lj.load_pretrained("kiddothe2b/longformer-base-4096", task="masked-lm")
    out = model.apply({"params": params}, input_ids, attention_mask=am, global_attention_mask=gm)
"""

from longformer_jax import attention
from longformer_jax.compile_options import use_training_xla_flags
from longformer_jax.config import LongformerConfig
from longformer_jax.heads import (
    LongformerForDocumentClassification,
    LongformerForMaskedLM,
    LongformerForMultipleChoice,
    LongformerForQuestionAnswering,
    LongformerForSequenceClassification,
    LongformerForSequentialSentenceClassification,
    LongformerForTokenClassification,
)
from longformer_jax.inputs import ModelInputs, global_slot_bucket, prepare_inputs
from longformer_jax.modeling import LongformerModel
from longformer_jax.pipeline import fill_mask
from longformer_jax.pretrained import load_pretrained, save_pretrained
from longformer_jax.state_dict import params_from_state_dict, state_dict_from_params
from longformer_jax.tasks import TASKS, build_model, init_params

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "LongformerConfig",
    "LongformerForDocumentClassification",
    "LongformerForMaskedLM",
    "LongformerForMultipleChoice",
    "LongformerForQuestionAnswering",
    "LongformerForSequenceClassification",
    "LongformerForSequentialSentenceClassification",
    "LongformerForTokenClassification",
    "LongformerModel",
    "ModelInputs",
    "attention",
    "build_model",
    "fill_mask",
    "global_slot_bucket",
    "init_params",
    "load_pretrained",
    "params_from_state_dict",
    "prepare_inputs",
    "save_pretrained",
    "state_dict_from_params",
    "use_training_xla_flags",
]
