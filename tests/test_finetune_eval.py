"""Fine-tuning objectives (train/objectives.py) against torch's losses, and the scores and decoding of
train/finetune_eval.py against scikit-learn and SQuAD's definitions."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

from longformer_jax.losses import IGNORE_INDEX
from train import finetune_data as fd
from train import finetune_eval as fe
from train.objectives import classification_objective, span_objective


class _Outputs:
    """A stand-in model whose outputs are its 'params' (the objectives only read the head's outputs)."""

    def apply(self, variables, *args, **kwargs):
        return types.SimpleNamespace(**variables["params"])


def _sums(objective, outputs, batch):
    loss_sum, metrics = objective.sums(_Outputs(), outputs, batch, None, True)
    return float(loss_sum / objective.count(batch)), {k: float(v) for k, v in metrics.items()}


def _batch(**targets):
    return {"input_ids": None, "attention_mask": None, "global_attention_mask": None, **targets}


def test_single_label_loss_is_cross_entropy(torch):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4, 3)).astype(np.float32)  # e.g. (batch, blocks, labels)
    labels = rng.integers(0, 3, size=(5, 4)).astype(np.int32)
    labels[1, 2:] = IGNORE_INDEX
    loss, metrics = _sums(classification_objective(0), {"logits": jnp.asarray(logits)}, _batch(labels=labels))
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 3), torch.tensor(labels).reshape(-1).long(), ignore_index=IGNORE_INDEX
    )
    assert loss == pytest.approx(float(want), rel=1e-6)
    valid = labels != IGNORE_INDEX
    assert metrics["accuracy"] == ((logits.argmax(-1) == labels) & valid).sum()


def test_multi_label_loss_is_bce_with_logits(torch):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = (rng.random((6, 5)) > 0.5).astype(np.float32)
    labels[4] = IGNORE_INDEX  # a filler row
    objective = classification_objective(0, multi_label=True)
    loss, metrics = _sums(objective, {"logits": jnp.asarray(logits)}, _batch(labels=labels))
    keep = np.arange(6) != 4
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits[keep]), torch.tensor(labels[keep]))
    assert loss == pytest.approx(float(want), rel=1e-6)
    exact = ((logits[keep] > 0) == (labels[keep] > 0.5)).all(-1).sum()
    assert metrics["accuracy"] == exact and float(objective.count(_batch(labels=labels))) == 5


def test_span_loss_is_transformers(torch):
    rng = np.random.default_rng(2)
    start, end = rng.normal(size=(2, 3, 16)).astype(np.float32)
    s, e = np.array([3, 0, IGNORE_INDEX], np.int32), np.array([5, 0, IGNORE_INDEX], np.int32)
    loss, metrics = _sums(
        span_objective(0),
        {"start_logits": jnp.asarray(start), "end_logits": jnp.asarray(end)},
        _batch(start_positions=s, end_positions=e),
    )
    ce = torch.nn.functional.cross_entropy
    want = (
        ce(torch.tensor(start[:2]), torch.tensor(s[:2]).long()) + ce(torch.tensor(end[:2]), torch.tensor(e[:2]).long())
    ) / 2
    assert loss == pytest.approx(float(want), rel=1e-6)
    assert metrics["exact"] == ((start[:2].argmax(-1) == s[:2]) & (end[:2].argmax(-1) == e[:2])).sum()


def test_squad_scores():
    assert fe.normalize_answer("The  Cat, sat!") == "cat sat"
    assert fe.answer_f1("the cat sat", "a cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert fe.answer_f1("dog", "cat") == 0.0
    s = fe.squad_scores(["Paris", "the red one", "x"], [["paris", "Paris, France"], ["red"], ["y", "x y"]])
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx((1 + 2 * 0.5 * 1 / 1.5 + 2 * 1 * 0.5 / 1.5) / 3)


def test_label_scores_are_sklearns():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(3)
    t, p = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
    got = fe.label_scores(t, p, ["a", "b", "c", "d"])
    assert got["accuracy"] == accuracy_score(t, p)
    assert got["macro_f1"] == f1_score(t, p, average="macro", zero_division=0)
    assert got["micro_f1"] == f1_score(t, p, average="micro", zero_division=0)
    assert set(got["report"]) >= {"a", "b", "c", "d", "macro avg"}
    T, P = rng.integers(0, 2, (20, 3)), rng.integers(0, 2, (20, 3))
    got = fe.label_scores(T, P, ["x", "y", "z"])
    assert got["micro_f1"] == f1_score(T, P, average="micro", zero_division=0)
    assert got["accuracy"] == accuracy_score(T, P)


def test_best_span_and_decoding():
    L = 12
    spans = np.full((L, 2), -1, np.int32)
    spans[4:9] = [(0, 3), (4, 7), (8, 11), (12, 15), (16, 19)]
    start, end = np.zeros(L), np.zeros(L)
    start[0], end[0] = 9, 9  # <s>: never an answer
    start[5], end[7], end[4] = 3, 2, 4  # best: start 5 + end 7 = 5 (start 5 + end 4: the end before the start)
    assert fe._best_span(start, end, spans, max_tokens=30)[1:] == (5, 7)
    assert fe._best_span(start, end, spans, max_tokens=2)[1:] == (4, 4)  # 7 - 5 >= 2 tokens: the next best
    enc = fd.Encoded(
        "question-answering", {}, np.array([0, 0]), np.stack([spans, spans]), ["q"], [["b c"]], ["aaa bbb ccc ddd eee"]
    )
    out = fe.decode(
        enc,
        {"start_logits": np.stack([start, start - 1]), "end_logits": np.stack([end, end])},
        fe.FinetuneSettings("question-answering"),
        None,
    )
    assert out == [{"id": "q", "prediction": "bbb ccc ddd", "scores": {"score": 5.0, "start": 4}}]
    labels = fd.LabelSet(("a", "b", "c"))
    enc = fd.Encoded("document-classification", {}, np.array([0, 1]), None, ["x", "y"], [None, None])
    logits = np.array([[2.0, -1.0, 0.5], [-3.0, -2.0, -1.0]])
    multi = fe.decode(enc, {"logits": logits}, fe.FinetuneSettings("document-classification", multi_label=True), labels)
    assert [m["prediction"] for m in multi] == [["a", "c"], []]
    single = fe.decode(enc, {"logits": logits}, fe.FinetuneSettings("document-classification"), labels)
    assert [m["prediction"] for m in single] == ["a", "c"]
    assert sum(single[0]["scores"].values()) == pytest.approx(1.0)
