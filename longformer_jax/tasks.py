"""The task registry: the one home of what a task name means.

One :class:`Task` per name (``"masked-lm"``, ``"question-answering"``, ...) says which Flax class
builds it, its Hugging Face ``architectures`` name and ``transformers`` Auto class (None where
``transformers`` has no such head), the head settings kept in ``config.json`` (``config.extra``) and
the global attention the head places by itself when no ``global_attention_mask`` is given.

Built on it: :func:`check_task`, :func:`build_model` and its inverse :func:`task_of_model` /
:func:`config_for_model`, :func:`init_params`, :func:`automatic_global_attention_mask` and
:func:`infer_task` (a checkpoint's task from config.json's ``architectures`` or its weight names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from longformer_jax import global_rules, heads
from longformer_jax.config import LongformerConfig
from longformer_jax.modeling import LongformerModel

Array = jax.Array
# (model, input_ids, attention_mask) -> the (..., L) int32 global attention mask the head would use.
GlobalAttentionRule = Callable[[nn.Module, Array, Array], Array]


def _first_token(model, input_ids, attention_mask):
    """HF's sequence classification: global attention on position 0 (``<s>``)."""
    return global_rules.first_token_global_mask(input_ids)


def _question(model, input_ids, attention_mask):
    """HF's question answering: every token before the first ``</s>`` (the question and ``<s>``)."""
    return global_rules.question_global_attention_mask(jnp.asarray(input_ids), model.config.sep_token_id)


def _choices(model, input_ids, attention_mask):
    """HF's multiple choice: every token after the first ``</s></s>``, per choice."""
    ids = jnp.asarray(input_ids)
    flat = global_rules.choice_global_attention_mask(ids.reshape(-1, ids.shape[-1]), model.config.sep_token_id)
    return flat.reshape(ids.shape)


def _block_starts(model, input_ids, attention_mask):
    """The seed checkpoint's layout: the first token of every non-empty sentence block."""
    am = jnp.ones(jnp.shape(input_ids), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    return global_rules.block_start_global_mask(am, model.sentence_block_size)


@dataclasses.dataclass(frozen=True)
class Task:
    """What one task name means.

    Attributes:
        name: the task name (``"masked-lm"``, ...).
        model_class: the Flax module class that builds it.
        hf_architecture: its ``architectures`` entry in config.json.
        auto_class: the ``transformers`` Auto class of the PyTorch model, None where there is none.
        global_attention: the rule the head applies when no ``global_attention_mask`` is given, as
            ``rule(model, input_ids, attention_mask)``; None: no automatic global attention.
        settings: head settings ``(name, default)``: module attributes kept in ``config.extra``.
    """

    name: str
    model_class: type[nn.Module]
    hf_architecture: str
    auto_class: str | None
    global_attention: GlobalAttentionRule | None = None
    settings: tuple[tuple[str, Any], ...] = ()


_BLOCK = ("sentence_block_size", 128)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("base", LongformerModel, "LongformerModel", "AutoModel", settings=(("add_pooling_layer", True),)),
        Task("masked-lm", heads.LongformerForMaskedLM, "LongformerForMaskedLM", "AutoModelForMaskedLM"),
        Task(
            "sequence-classification",
            heads.LongformerForSequenceClassification,
            "LongformerForSequenceClassification",
            "AutoModelForSequenceClassification",
            _first_token,
        ),
        Task(
            "token-classification",
            heads.LongformerForTokenClassification,
            "LongformerForTokenClassification",
            "AutoModelForTokenClassification",
        ),
        Task(
            "question-answering",
            heads.LongformerForQuestionAnswering,
            "LongformerForQuestionAnswering",
            "AutoModelForQuestionAnswering",
            _question,
        ),
        Task(
            "multiple-choice",
            heads.LongformerForMultipleChoice,
            "LongformerForMultipleChoice",
            "AutoModelForMultipleChoice",
            _choices,
        ),
        Task(
            "document-classification",
            heads.LongformerForDocumentClassification,
            "LongformerForDocumentClassification",
            None,
            _block_starts,
            (_BLOCK, ("pooling", "max")),
        ),
        Task(
            "sequential-sentence-classification",
            heads.LongformerForSequentialSentenceClassification,
            "LongformerForSequentialSentenceClassification",
            None,
            _block_starts,
            (_BLOCK,),
        ),
    )
}


def check_task(task: str) -> str:
    """Returns ``task`` when it is a registered task name; raises ValueError naming the choices."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; expected one of {list(TASKS)}.")
    return task


# ---------------------------------------------------------------------------------------- models
def build_model(config: LongformerConfig, task: str = "masked-lm") -> nn.Module:
    """The Flax module for ``task``; head settings (e.g. ``pooling``) come from ``config.extra``."""
    spec = TASKS[check_task(task)]
    kwargs = {name: type(default)(config.extra.get(name, default)) for name, default in spec.settings}
    return spec.model_class(config, **kwargs)


def task_of_model(model: nn.Module) -> str:
    """The task name of a module made by :func:`build_model` (or the classes themselves)."""
    for spec in TASKS.values():
        if type(model) is spec.model_class:
            return spec.name
    raise ValueError(
        f"{type(model).__name__} is not a longformer_jax model; expected one of "
        f"{[t.model_class.__name__ for t in TASKS.values()]}."
    )


def config_for_model(model: nn.Module) -> LongformerConfig:
    """``model.config`` with the head settings of ``model`` in ``extra``: :func:`build_model` of it and the
    task gives the same module back (what a saved config.json must hold)."""
    spec = TASKS[task_of_model(model)]
    extra = {**model.config.extra, **{name: getattr(model, name) for name, _ in spec.settings}}
    return model.config.replace(extra=extra)


def _dummy_inputs(model: nn.Module, task: str) -> Array:
    cfg = model.config
    if task == "multiple-choice":
        return jnp.full((1, 2, cfg.max_window), cfg.bos_token_id, jnp.int32)
    length = cfg.max_window
    if "sentence_block_size" in dict(TASKS[task].settings):  # whole blocks, padded to the window
        blocks = model.sentence_block_size
        length = blocks + (-blocks) % cfg.max_window
    return jnp.full((1, length), cfg.bos_token_id, jnp.int32)


def init_params(model: nn.Module, rng: jax.Array | int = 0, abstract: bool = False):
    """Fresh parameters (HF's initialisation: normal(initializer_range), LayerNorm 1/0).

    ``abstract=True`` gives their shapes and dtypes only (``jax.ShapeDtypeStruct``), nothing computed.
    """
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    ids = _dummy_inputs(model, task_of_model(model))

    def init(r):
        return model.init(r, ids, global_attention_mask=jnp.zeros_like(ids), num_global_slots=0)["params"]

    if abstract:
        return jax.eval_shape(init, rng)
    return jax.jit(init)(rng)


def automatic_global_attention_mask(model: nn.Module, input_ids, attention_mask=None) -> Array | None:
    """The global attention mask ``model`` places itself when called without one; None when it places none.

    Useful to count global tokens on the host (``num_global_slots`` under ``jax.jit``) or to extend the
    automatic mask with more tokens.
    """
    rule = TASKS[task_of_model(model)].global_attention
    return None if rule is None else rule(model, input_ids, attention_mask)


# ---------------------------------------------------------------------------------------- checkpoints
def task_of_architecture(architecture: str) -> str | None:
    """The task of an HF ``architectures`` entry (RoBERTa names map to their Longformer twins)."""
    if architecture.startswith("Roberta"):
        architecture = "Longformer" + architecture[len("Roberta") :]
    return next((t.name for t in TASKS.values() if t.hf_architecture == architecture), None)


def _task_of_keys(keys: set[str]) -> str:
    if any(k.startswith("lm_head.") for k in keys):
        return "masked-lm"
    if any(k.startswith("qa_outputs.") for k in keys):
        return "question-answering"
    if any(k.startswith("classifier.out_proj.") for k in keys):
        return "sequence-classification"
    if "classifier.weight" in keys:
        return "multiple-choice" if has_pooler(keys) else "token-classification"
    return "base"


def has_pooler(keys) -> bool:
    """True when HF state-dict names hold a pooler (``pooler.*`` or ``<prefix>.pooler.*``)."""
    return any(k.startswith("pooler.") or ".pooler." in k for k in keys)


def infer_task(
    config_dict: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None, source: Any = "config.json"
) -> str:
    """The task of a checkpoint: from config.json's ``architectures``, else from its weight names."""
    for arch in config_dict.get("architectures") or ():
        task = task_of_architecture(arch)
        if task is not None:
            return task
    if state_dict is not None:
        return _task_of_keys(set(state_dict))
    raise ValueError(
        f"cannot tell the task of {source}: its `architectures` ({config_dict.get('architectures')}) names "
        f"no known head. Give the task (--task in the convert programs): one of {', '.join(TASKS)}."
    )
