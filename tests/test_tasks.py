"""The task registry: names, classes, HF architectures and Auto classes, head settings, automatic
global attention, and a checkpoint's task from config.json or its weight names."""

import jax
import numpy as np
import pytest

import longformer_jax as lj
from longformer_jax import tasks
from tests.conftest import tiny_hf_config


def test_registry_matches_transformers():
    transformers = pytest.importorskip("transformers")
    assert lj.TASKS is tasks.TASKS
    for name, spec in tasks.TASKS.items():
        assert spec.name == name and spec.model_class.__module__.startswith("longformer_jax.")
        if spec.auto_class is None:  # this project's own heads: transformers has no such class
            assert not hasattr(transformers, spec.hf_architecture), name
            continue
        auto = getattr(transformers, spec.auto_class)
        assert auto._model_mapping[transformers.LongformerConfig].__name__ == spec.hf_architecture, name
        assert spec.hf_architecture == spec.model_class.__name__


def test_check_task():
    assert tasks.check_task("question-answering") == "question-answering"
    with pytest.raises(ValueError, match=r"task='fill-mask' is unknown; expected one of \['base', 'masked-lm'"):
        tasks.check_task("fill-mask")
    with pytest.raises(ValueError, match="task='nope' is unknown"):
        lj.build_model(lj.LongformerConfig(num_hidden_layers=1, attention_window=4), "nope")


def test_build_model_and_its_inverse():
    cfg = lj.LongformerConfig(
        num_hidden_layers=1,
        attention_window=4,
        hidden_size=32,
        num_attention_heads=4,
        extra={"pooling": "attentive", "sentence_block_size": 8, "add_pooling_layer": False},
    )
    for name, spec in tasks.TASKS.items():
        model = lj.build_model(cfg, name)
        assert type(model) is spec.model_class and tasks.task_of_model(model) == name
        again = lj.build_model(tasks.config_for_model(model), name)
        assert again == model
    assert lj.build_model(cfg, "document-classification").pooling == "attentive"
    assert lj.build_model(cfg, "sequential-sentence-classification").sentence_block_size == 8
    assert lj.build_model(cfg, "base").add_pooling_layer is False
    plain = lj.LongformerConfig(num_hidden_layers=1, attention_window=4)
    doc = lj.LongformerForDocumentClassification(plain, pooling="last", sentence_block_size=16)
    assert tasks.config_for_model(doc).extra == {"pooling": "last", "sentence_block_size": 16}
    assert lj.build_model(plain, "base").add_pooling_layer is True
    with pytest.raises(ValueError, match="int is not a longformer_jax model"):
        tasks.task_of_model(3)


def _inputs(task):
    """Token ids laid out as each head's automatic global attention expects (B=2, L=16, window 8)."""
    row = [0, 11, 12, 2, 2, 21, 22, 23, 24, 25, 26, 27, 28, 2, 1, 1]  # <s> q q </s></s> context </s> pad pad
    ids = np.array([row, row[:12] + [2, 1, 1, 1]])
    am = (ids != 1).astype(np.int32)
    if task == "multiple-choice":
        return np.stack([ids, ids[::-1]], axis=0), np.stack([am, am[::-1]], axis=0)
    return ids, am


@pytest.mark.slow
@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_automatic_global_attention_is_what_the_head_does(task):
    """Passing automatic_global_attention_mask explicitly gives the head's own default output."""
    cfg = lj.LongformerConfig.from_dict(tiny_hf_config(attention_window=8).to_dict())
    cfg = cfg.replace(extra={"sentence_block_size": 8})
    model = lj.build_model(cfg, task)
    ids, am = _inputs(task)
    gm = tasks.automatic_global_attention_mask(model, ids, am)
    if tasks.TASKS[task].global_attention is None:
        assert gm is None
        return
    gm = np.asarray(gm)
    assert gm.shape == ids.shape and gm.any() and not gm.all()
    params = lj.init_params(model, 1)
    default = model.apply({"params": params}, ids, attention_mask=am)
    explicit = model.apply({"params": params}, ids, attention_mask=am, global_attention_mask=gm)
    field = "start_logits" if task == "question-answering" else "logits"
    np.testing.assert_array_equal(getattr(default, field), getattr(explicit, field))


def test_expected_automatic_masks():
    cfg = lj.LongformerConfig.from_dict(tiny_hf_config(attention_window=8).to_dict())
    ids, am = _inputs("question-answering")
    qa = lj.build_model(cfg, "question-answering")
    np.testing.assert_array_equal(tasks.automatic_global_attention_mask(qa, ids, am)[0], [1] * 3 + [0] * 13)
    sc = lj.build_model(cfg, "sequence-classification")
    np.testing.assert_array_equal(tasks.automatic_global_attention_mask(sc, ids, am)[1], [1] + [0] * 15)
    mc = lj.build_model(cfg, "multiple-choice")
    ids_mc, am_mc = _inputs("multiple-choice")
    np.testing.assert_array_equal(tasks.automatic_global_attention_mask(mc, ids_mc, am_mc)[0, 0], [0] * 5 + [1] * 11)
    doc = lj.build_model(cfg.replace(extra={"sentence_block_size": 2}), "document-classification")
    np.testing.assert_array_equal(tasks.automatic_global_attention_mask(doc, ids, am)[1], [1, 0] * 7 + [0, 0])


def test_infer_task():
    assert tasks.infer_task({"architectures": ["LongformerForQuestionAnswering"]}) == "question-answering"
    assert tasks.infer_task({"architectures": ["RobertaForMaskedLM"]}) == "masked-lm"
    assert tasks.infer_task({"architectures": ["LongformerForDocumentClassification"]}) == "document-classification"
    by_keys = {
        "masked-lm": ["longformer.embeddings.word_embeddings.weight", "lm_head.bias"],
        "question-answering": ["qa_outputs.weight"],
        "sequence-classification": ["classifier.out_proj.weight"],
        "multiple-choice": ["longformer.pooler.dense.weight", "classifier.weight"],
        "token-classification": ["classifier.weight"],
        "base": ["embeddings.word_embeddings.weight", "pooler.dense.weight"],
    }
    for task, keys in by_keys.items():
        assert tasks.infer_task({"architectures": ["SomethingElse"]}, dict.fromkeys(keys), "x") == task
    with pytest.raises(ValueError, match=r"cannot tell the task of x: its `architectures` \(\['BertModel'\]\)"):
        tasks.infer_task({"architectures": ["BertModel"]}, None, "x")


def test_init_params_abstract_matches_concrete():
    cfg = lj.LongformerConfig.from_dict(tiny_hf_config().to_dict()).replace(extra={"sentence_block_size": 8})
    for task in ("multiple-choice", "sequential-sentence-classification"):
        model = lj.build_model(cfg, task)
        abstract = lj.init_params(model, 0, abstract=True)
        concrete = lj.init_params(model, 0)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
            lambda a: (a.shape, a.dtype), concrete
        )
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
