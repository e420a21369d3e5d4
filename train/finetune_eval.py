"""Fine-tuning outputs: per-record predictions, their scores, and inference with a fine-tuned model.

The one home of what a fine-tuned model's outputs mean:

- ``FinetuneSettings``: what a model was fine-tuned on (task, layout, lengths, multi-label, pooling, field
  names), kept in its ``config.json`` under ``"finetuning"`` so that inference lays inputs out the same way;
- ``decode(encoded, outputs, settings, labels)``: the per-record predictions of ``predictions.jsonl``
  (``{"id", "prediction", "scores"}``);
- ``score(encoded, predictions, labels, multi_label)``: the metrics of ``eval_results.json``. Labelled tasks:
  scikit-learn's ``accuracy_score`` and ``f1_score`` (micro, macro; ``zero_division=0``) and its per-label
  ``classification_report``; multi-label predictions are the labels whose sigmoid exceeds 0.5, scored as
  indicator matrices (accuracy: exact set match); sequential sentence classification scores every block
  (padding removed), token classification every word. Multiple choice: accuracy. Question answering:
  SQuAD v1.1's exact match and token F1 (the best over the gold answers), as fractions;
- ``Predictor``: a fine-tuned model directory (a run's ``best/`` or ``hf/``, or any HF classification
  directory) and records -> predictions (``python -m train.finetune --predict`` and :func:`classify`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from longformer_jax.inputs import pow2_bucket
from longformer_jax.pretrained import load_checkpoint, resolve_source
from longformer_jax.tasks import build_model
from train import data as data_lib
from train import finetune_data as fd
from train.objectives import Objective, classification_objective, masked_lm_choice_objective, span_objective
from train.trainer import make_predict_step

SETTINGS_KEY = "finetuning"  # config.json key of the FinetuneSettings
# The metric early stopping and the best checkpoint follow, per task (the authors' choice).
BEST_METRIC = {"multiple-choice": "accuracy", "question-answering": "f1"}
DEFAULT_BEST_METRIC = "micro_f1"
CHOICE_SCORINGS = fd.CHOICE_SCORINGS


def model_task_of(task: str, pooling: str = "max", choice_scoring: str = "cls") -> str:
    """The head (``longformer_jax.TASKS``) of a fine-tuning task with its pooling / choice scoring."""
    if task == "document-classification" and pooling == "cls":
        return "sequence-classification"
    if task == "multiple-choice" and choice_scoring == "masked-lm":
        return "masked-lm"
    return task


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """What a model was fine-tuned on; ``model_task`` is its head in ``longformer_jax.TASKS``."""

    task: str
    layout: str = "blocks"
    seq_len: int = 4096
    block_size: int = 128
    multi_label: bool = False
    pooling: str = "max"
    max_answer_tokens: int = 30
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    choice_scoring: str = "cls"

    @property
    def model_task(self) -> str:
        return model_task_of(self.task, self.pooling, self.choice_scoring)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def layout_of(self, tok: Any) -> fd.Layout:
        ids = data_lib.token_ids(tok)
        return fd.Layout(self.layout, self.seq_len, self.block_size, ids.bos, ids.eos, ids.pad)


def objective_for(
    task: str, num_global_slots: int, multi_label: bool = False, choice_scoring: str = "cls"
) -> Objective:
    """The fine-tuning objective of a task (``train.objectives``)."""
    if task == "question-answering":
        return span_objective(num_global_slots)
    if task == "multiple-choice" and choice_scoring == "masked-lm":
        return masked_lm_choice_objective(num_global_slots)
    return classification_objective(num_global_slots, multi_label)


def global_slots(*arrays: dict[str, np.ndarray]) -> int:
    """The static bound of global tokens per row: the most any row holds, rounded up to a power of two."""
    most = max(
        int(a["global_attention_mask"].reshape(-1, a["global_attention_mask"].shape[-1]).sum(-1).max()) for a in arrays
    )
    return pow2_bucket(most)


# ----------------------------------------------------------------------------------------------
# Predictions


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _label_prediction(logits_K: np.ndarray, names: Sequence[str], multi_label: bool) -> tuple[Any, dict, Any]:
    """(prediction, scores, index or indicator) of one labelled unit."""
    if multi_label:
        p = _sigmoid(logits_K)
        hot = (p > 0.5).astype(np.int32)
        return [n for n, h in zip(names, hot) if h], {n: float(v) for n, v in zip(names, p)}, hot
    p = _softmax(logits_K)
    k = int(np.argmax(logits_K))
    return names[k], {n: float(v) for n, v in zip(names, p)}, k


def _best_span(start_L: np.ndarray, end_L: np.ndarray, span_Lx2: np.ndarray, max_tokens: int, n_best: int = 20):
    """(score, first position, last position) of the best context span of one window (HF's n-best search)."""
    valid = span_Lx2[:, 0] >= 0
    if not valid.any():
        return None
    pos = np.nonzero(valid)[0]
    starts = pos[np.argsort(-start_L[pos], kind="stable")[:n_best]]
    ends = pos[np.argsort(-end_L[pos], kind="stable")[:n_best]]
    best = None
    for i in starts:
        for j in ends:
            if j < i or j - i >= max_tokens:
                continue
            s = float(start_L[i] + end_L[j])
            if best is None or s > best[0]:
                best = (s, int(i), int(j))
    return best


def _decode_spans(enc: fd.Encoded, outputs: dict[str, np.ndarray], max_tokens: int) -> list[dict]:
    best: dict[int, tuple] = {}
    for e, r in enumerate(enc.record):
        b = _best_span(outputs["start_logits"][e], outputs["end_logits"][e], enc.positions[e], max_tokens)
        if b is not None and (r not in best or b[0] > best[r][0]):
            best[r] = (*b, e)
    out = []
    for r, rid in enumerate(enc.ids):
        if r not in best:
            out.append({"id": rid, "prediction": "", "scores": {"score": None, "start": None}})
            continue
        s, i, j, e = best[r]
        a, b = int(enc.positions[e][i][0]), int(enc.positions[e][j][1])
        text = enc.contexts[r][a:b]
        lead = len(text) - len(text.lstrip())
        out.append({"id": rid, "prediction": text.strip(), "scores": {"score": s, "start": a + lead}})
    return out


def _decode_units(enc: fd.Encoded, logits: np.ndarray, names: Sequence[str], multi_label: bool):
    """Sequential sentence (per block) and token (per word) classification: one prediction per unit."""
    per: list[list[Any]] = [[None] * (n or 0) for n in enc.units]
    for e, r in enumerate(enc.record):
        for p, u in enumerate(enc.positions[e]):
            if u >= 0 and per[r][u] is None:
                per[r][u] = _label_prediction(logits[e][p], names, multi_label)
    return [
        {"id": rid, "prediction": [u[0] for u in units], "scores": [u[1] for u in units]}
        for rid, units in zip(enc.ids, per)
    ]


def decode(
    enc: fd.Encoded, outputs: dict[str, np.ndarray], settings: FinetuneSettings, labels: fd.LabelSet | None
) -> list[dict]:
    """One ``{"id", "prediction", "scores"}`` per record from the per-example outputs (see the module docstring)."""
    if enc.task == "question-answering":
        return _decode_spans(enc, outputs, settings.max_answer_tokens)
    logits = outputs["logits"]
    if enc.task == "multiple-choice":
        return [
            {"id": rid, "prediction": int(np.argmax(logits[e])), "scores": [float(p) for p in _softmax(logits[e])]}
            for rid, e in zip(enc.ids, range(len(enc.ids)))
        ]
    if enc.task == "document-classification":
        out = []
        for rid, e in zip(enc.ids, range(len(enc.ids))):
            pred, scores, _ = _label_prediction(logits[e], labels.names, settings.multi_label)
            out.append({"id": rid, "prediction": pred, "scores": scores})
        return out
    return _decode_units(enc, logits, labels.names, settings.multi_label)


# ----------------------------------------------------------------------------------------------
# Scores


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answer_f1(prediction: str, truth: str) -> float:
    """SQuAD v1.1's token F1 of two answers."""
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 (each the best over the gold answers), averaged over the questions."""
    em = [max(float(normalize_answer(p) == normalize_answer(a)) for a in gold) for p, gold in zip(predictions, answers)]
    f1 = [max(answer_f1(p, a) for a in gold) for p, gold in zip(predictions, answers)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}


def label_scores(y_true: Any, y_pred: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """scikit-learn's accuracy, micro-F1 and macro-F1 (``zero_division=0``) and, with ``names``, its
    per-label report, of label indices (or indicator matrices)."""
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    if names is not None:
        if np.ndim(y_true) == 2:  # multi-label: every label's column
            present = list(range(len(names)))
        else:
            present = sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))
        out["report"] = classification_report(
            y_true,
            y_pred,
            labels=list(present),
            target_names=[names[i] for i in present],
            output_dict=True,
            zero_division=0,
        )
    return out


def _indices(values: Sequence[Any], labels: fd.LabelSet, multi_label: bool) -> np.ndarray:
    if not multi_label:
        return np.asarray([labels.names.index(v) for v in values], np.int64)
    hot = np.zeros((len(values), len(labels)), np.int64)
    for row, v in enumerate(values):
        for name in v:
            hot[row, labels.names.index(name)] = 1
    return hot


def _gold_names(gold: Any, labels: fd.LabelSet, multi_label: bool) -> Any:
    if multi_label:
        return [labels.names[i] for i in np.nonzero(np.asarray(gold))[0]]
    return labels.names[int(gold)]


def score(
    enc: fd.Encoded, predictions: list[dict], labels: fd.LabelSet | None, multi_label: bool = False, report: bool = True
) -> dict[str, Any]:
    """The metrics of ``predictions`` (``decode``'s) against the gold targets of ``enc``."""
    if enc.task == "question-answering":
        return squad_scores([p["prediction"] for p in predictions], enc.gold)
    if enc.task == "multiple-choice":
        return {"accuracy": float(np.mean([p["prediction"] == g for p, g in zip(predictions, enc.gold)]))}
    if enc.task == "document-classification":
        gold = [_gold_names(g, labels, multi_label) for g in enc.gold]
        pred = [p["prediction"] for p in predictions]
    else:
        gold = [_gold_names(g, labels, multi_label) for gs in enc.gold for g in gs]
        pred = [u for p in predictions for u in p["prediction"]]
    return label_scores(
        _indices(gold, labels, multi_label), _indices(pred, labels, multi_label), labels.names if report else None
    )


def best_metric_name(task: str) -> str:
    return BEST_METRIC.get(task, DEFAULT_BEST_METRIC)


# ----------------------------------------------------------------------------------------------
# Inference


def collect(batches: list[dict[str, np.ndarray]], n: int, predict) -> tuple[list[dict], dict[str, np.ndarray]]:
    """``predict(batch) -> (sums, outputs)`` over the batches: the sums and the first ``n`` rows of the outputs."""
    sums, outs = [], collections.defaultdict(list)
    for b in batches:
        s, o = predict(b)
        sums.append(s)
        for k, v in o.items():
            outs[k].append(np.asarray(v))
    return sums, {k: np.concatenate(v)[:n] for k, v in outs.items()}


class Predictor:
    """A fine-tuned model directory, ready to predict records (on one device, compiled once per bucket).

    ``model_dir``: a Flax checkpoint or an HF directory with a task head (a run's ``best/`` or ``hf/``);
    its ``config.json`` ``"finetuning"`` settings say how inputs are laid out and which record fields
    hold what (``field_overrides``: other field names, e.g. ``{"text": "body"}``). An HF classification model
    made elsewhere has none: it is read as document classification on ``<s>`` in the contiguous layout.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        batch_size: int = 8,
        dtype: str = "float32",
        field_overrides: dict[str, str] | None = None,
    ):
        directory = resolve_source(model_dir)
        config, task, params, _ = load_checkpoint(directory, dtype=dtype)
        self.settings = settings_of(config, task)
        if self.settings.model_task != task:
            raise ValueError(
                f"{directory}: config.json's finetuning settings say {self.settings.task!r} "
                f"(pooling {self.settings.pooling!r}) but the weights are a {task!r} model"
            )
        self.model, self.params = build_model(config, task), params
        self.tok = data_lib.load_tokenizer(str(directory), model_max_length=self.settings.seq_len)
        names = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else None
        self.labels = fd.LabelSet(tuple(names), f"{directory}/config.json") if names else None
        if self.settings.task in fd.LABELLED_TASKS and self.labels is None:
            self.labels = fd.LabelSet(tuple(f"LABEL_{i}" for i in range(config.num_labels)), str(directory))
        self.fields = fd.Fields(**{**self.settings.fields, **(field_overrides or {})})
        self.batch_size = batch_size
        self._steps: dict[int, Any] = {}

    def encoder(self) -> fd.TaskEncoder:
        return fd.TaskEncoder(
            self.settings.task,
            self.tok,
            self.settings.layout_of(self.tok),
            self.fields,
            self.labels,
            self.settings.multi_label,
            self.settings.choice_scoring,
        )

    def _step(self, slots: int):
        if slots not in self._steps:
            objective = objective_for(
                self.settings.task, slots, self.settings.multi_label, self.settings.choice_scoring
            )
            self._steps[slots] = jax.jit(make_predict_step(self.model, objective))
        return self._steps[slots]

    def predict(self, records: fd.Records) -> tuple[list[dict], fd.Encoded, fd.TaskEncoder]:
        """(predictions, the encoded records, the encoder with its truncation report)."""
        encoder = self.encoder()
        enc = encoder.encode(records, "predict", targets=False)
        step = self._step(global_slots(enc.arrays))
        _, outputs = collect(
            fd.eval_batches(enc.arrays, self.batch_size), len(enc), lambda b: jax.device_get(step(self.params, b))
        )
        return decode(enc, outputs, self.settings, self.labels), enc, encoder

    def classify(self, texts: Any, pairs: Any = None) -> Any:
        """:func:`classify` on this model: ``{"label", "scores"}`` per text (one text: one dict)."""
        task = self.settings.task
        if task not in fd.LABELLED_TASKS:
            raise ValueError(
                f"this is a {task} model; classify takes classification models (predict the others "
                "with python -m train.finetune --predict)."
            )
        single = isinstance(texts, str) or (
            task != "document-classification" and bool(texts) and isinstance(texts[0], str)
        )
        texts = [texts] if single else list(texts)
        rows = [{self.fields.text: t} for t in texts]
        if pairs is not None:
            if self.fields.pair is None:
                raise ValueError("this model was fine-tuned without a pair field; leave pairs out.")
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(rows):
                raise ValueError(f"{len(pairs)} pairs for {len(rows)} texts; give one per text.")
            for row, pair in zip(rows, pairs):
                row[self.fields.pair] = pair
        predictions, _, _ = self.predict(fd.Records(rows, "classify"))
        out = [{"label": p["prediction"], "scores": p["scores"]} for p in predictions]
        return out[0] if single else out


@functools.lru_cache(maxsize=4)
def _predictor(directory: str, dtype: str, batch_size: int) -> Predictor:
    return Predictor(directory, batch_size=batch_size, dtype=dtype)


def classify(model_dir, texts, *, pairs=None, batch_size: int = 8, dtype: str = "float32"):
    """Labels of ``texts`` from a model fine-tuned by ``python -m train.finetune`` (a directory).

    ``texts``: one text or a list. Document classification: a string (or a list of paragraphs), with
    ``pairs`` the second texts (e.g. NLI hypotheses) of a model fine-tuned with a pair field; sequential
    sentence classification: a list of blocks; token classification: a list of words (or a string).
    Returns, per text, ``{"label": ..., "scores": ...}``: the label's name and every label's probability
    (multi-label: the list of labels whose sigmoid exceeds 0.5, and every label's sigmoid); for sequential
    sentence and token classification, one label and one score dict per block or word. Each text is laid
    out exactly as the model was fine-tuned (the model's ``"finetuning"`` settings). The loaded model is
    kept for the next call with the same directory.
    """
    return _predictor(str(resolve_source(model_dir)), dtype, batch_size).classify(texts, pairs=pairs)


def settings_of(config: Any, task: str) -> FinetuneSettings:
    """The ``"finetuning"`` settings of a model's config, or those of an HF classification head."""
    saved = config.extra.get(SETTINGS_KEY)
    if saved:
        return FinetuneSettings.from_dict(saved)
    guess = {"sequence-classification": "document-classification"}.get(task, task)
    if guess not in fd.TASK_NAMES or guess == "sequential-sentence-classification":
        raise ValueError(
            f"a {task!r} model without fine-tuning settings in its config.json cannot predict; use a "
            "model written by python -m train.finetune (RUN/best or RUN/hf)"
        )
    return FinetuneSettings(
        guess,
        "contiguous",
        min(4096, config.max_sequence_length),
        128,
        config.problem_type == "multi_label_classification",
        "cls" if task == "sequence-classification" else config.extra.get("pooling", "max"),
    )
