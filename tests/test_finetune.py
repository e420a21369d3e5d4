"""The fine-tuning program (train/finetune.py) on tiny models and synthetic tasks: every task trains (the
validation loss falls), predictions.jsonl rescored with scikit-learn equals eval_results.json, --predict and
classify give the run's predictions, the HF exports equal the Flax model in transformers, bad input is one
`error:` line and exit 1 with no checkpoint touched."""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest

import longformer_jax as lj
from tests.conftest import max_diff
from tests.finetune_fixtures import LABELS, build_base_model, finetune_args, write_task
from train import finetune
from train import finetune_data as fd
from train.finetune_eval import classify
from train.objectives import choice_token_scores as lj_choice_scores

TASKS = (
    "document-classification",
    "multi-label",
    "sequential-sentence-classification",
    "multiple-choice",
    "question-answering",
    "token-classification",
)
# Single-label documents with HF's classifier on <s> (exported to transformers); multi-label with max pooling.
EXTRA = {"document-classification": ("--pooling", "cls")}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"root": root, "base": build_base_model(root), "runs": {}}


def run_task(space, task: str, *extra: str) -> Path:
    """A finished run of `task` (cached per module)."""
    extra = extra or EXTRA.get(task, ())
    key = (task, extra)
    if key not in space["runs"]:
        folder = write_task(space["root"] / "tasks", task)
        out = space["root"] / "runs" / f"{task}-{len(space['runs'])}"
        assert finetune.main(finetune_args(task, folder, space["base"], out, *extra)) == 0
        space["runs"][key] = out
    return space["runs"][key]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- rescoring
def _squad_normalize(s: str) -> str:  # SQuAD v1.1's evaluate script
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    return " ".join(remove_articles("".join(ch for ch in s.lower() if ch not in set(string.punctuation))).split())


def _squad_f1(prediction: str, truth: str) -> float:
    p, t = _squad_normalize(prediction).split(), _squad_normalize(truth).split()
    common = sum((collections.Counter(p) & collections.Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def rescore(task: str, gold_rows: list[dict], predictions: list[dict]) -> dict[str, float]:
    """The test split's metrics from predictions.jsonl and test.jsonl, computed here with scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    by_id = {p["id"]: p for p in predictions}
    assert set(by_id) == {r["id"] for r in gold_rows}
    pred = [by_id[r["id"]]["prediction"] for r in gold_rows]
    if task == "question-answering":
        answers = [r["answers"]["text"] for r in gold_rows]
        em = [max(float(_squad_normalize(p) == _squad_normalize(a)) for a in g) for p, g in zip(pred, answers)]
        return {
            "exact_match": float(np.mean(em)),
            "f1": float(np.mean([max(_squad_f1(p, a) for a in g) for p, g in zip(pred, answers)])),
        }
    if task == "multiple-choice":
        return {"accuracy": accuracy_score([r["label"] for r in gold_rows], pred)}
    if task == "multi-label":
        binarizer = MultiLabelBinarizer(classes=LABELS).fit([LABELS])
        y_true, y_pred = binarizer.transform([r["labels"] for r in gold_rows]), binarizer.transform(pred)
    elif task == "document-classification":
        y_true, y_pred = [r["label"] for r in gold_rows], pred
    else:
        y_true = [lab for r in gold_rows for lab in r["labels"]]
        y_pred = [lab for p in pred for lab in p]
    return {
        "accuracy": accuracy_score(y_true, y_pred),
        "micro_f1": f1_score(y_true, y_pred, average="micro", zero_division=0),
        "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
    }


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_task_trains_and_its_scores_are_sklearns(space, task):
    out = run_task(space, task)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 24
    assert evals[-1]["loss"] < 0.99 * evals[0]["loss"], [e["loss"] for e in evals]
    results = json.loads((out / "eval_results.json").read_text())
    gold = read_jsonl(space["root"] / "tasks" / task / "test.jsonl")
    predictions = read_jsonl(out / "predictions.jsonl")
    for k, v in rescore(task, gold, predictions).items():
        assert results["test"][k] == pytest.approx(v, abs=1e-12), k
    assert results["validation"][results["best_metric"]] == pytest.approx(
        max(e[results["best_metric"]] for e in evals), abs=1e-12
    )
    assert (out / "best" / "config.json").is_file() and (out / "curves.png").is_file()
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["finetuning"]["task"] == ("document-classification" if task == "multi-label" else task)
    if task in ("document-classification", "multi-label", "sequential-sentence-classification"):
        assert config["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
        assert {k for k in results["test"]["report"]} >= set(LABELS) - {"O"}
    if task == "multi-label":
        assert config["problem_type"] == "multi_label_classification"


@pytest.mark.slow
def test_predict_and_classify_give_the_runs_predictions(space, tmp_path):
    out = run_task(space, "document-classification")
    test = space["root"] / "tasks" / "document-classification" / "test.jsonl"
    dst = tmp_path / "p.jsonl"
    assert finetune.main(["--predict", "--init", str(out), "--data", str(test), "--predictions", str(dst)]) == 0
    mine, theirs = read_jsonl(dst), read_jsonl(out / "predictions.jsonl")
    assert [p["prediction"] for p in mine] == [p["prediction"] for p in theirs]
    for a, b in zip(mine, theirs):
        assert max(abs(a["scores"][k] - b["scores"][k]) for k in LABELS) < 1e-5
    rows = read_jsonl(test)
    got = classify(out / "best", [r["text"] for r in rows])
    assert [g["label"] for g in got] == [p["prediction"] for p in theirs]
    one = classify(out / "best", rows[0]["text"])
    assert one["label"] == theirs[0]["prediction"] and set(one["scores"]) == set(LABELS)
    ssc = run_task(space, "sequential-sentence-classification")
    row = read_jsonl(space["root"] / "tasks" / "sequential-sentence-classification" / "test.jsonl")[0]
    pred = next(p for p in read_jsonl(ssc / "predictions.jsonl") if p["id"] == row["id"])
    assert classify(ssc / "best", row["text"])["label"] == pred["prediction"]


def test_block_heads_are_flax_only(space):
    for task in ("multi-label", "sequential-sentence-classification"):
        results = json.loads((run_task(space, task) / "eval_results.json").read_text())
        assert results["hf_dir"] is None and not (run_task(space, task) / "hf").exists()
        assert results["model_task"] == ("document-classification" if task == "multi-label" else task)
    config = json.loads((Path(results["best_dir"]) / "config.json").read_text())
    assert config["architectures"] == ["LongformerForSequentialSentenceClassification"]
    config = json.loads((run_task(space, "multi-label") / "best" / "config.json").read_text())
    assert config["architectures"] == ["LongformerForDocumentClassification"] and config["pooling"] == "max"
    model, _ = lj.load_pretrained(run_task(space, "multi-label") / "best", task="document-classification")
    assert model.pooling == "max" and model.sentence_block_size == 16


# ----------------------------------------------------------------------------------------------- HF export
HF = {
    "document-classification": "AutoModelForSequenceClassification",
    "multiple-choice": "AutoModelForMultipleChoice",
    "question-answering": "AutoModelForQuestionAnswering",
    "token-classification": "AutoModelForTokenClassification",
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(HF))
def test_hf_export_equals_the_flax_model(space, task, torch):
    transformers = pytest.importorskip("transformers")
    out = run_task(space, task)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["hf_dir"] == str(out / "hf")
    hf = getattr(transformers, HF[task]).from_pretrained(out / "hf").eval()
    if task != "multiple-choice" and task != "question-answering":
        assert hf.config.id2label == dict(
            enumerate(json.loads((out / "best" / "config.json").read_text())["id2label"].values())
        )
    predictor = __import__("train.finetune_eval", fromlist=["Predictor"]).Predictor(out / "best")
    enc = predictor.encoder().encode(fd.read_records(space["root"] / "tasks" / task, "test"), "test")
    batch = {k: enc.arrays[k][:4] for k in ("input_ids", "attention_mask", "global_attention_mask")}
    flax_out = predictor.model.apply({"params": predictor.params}, **batch)
    with torch.no_grad():
        torch_out = hf(**{k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()})
    names = ("start_logits", "end_logits") if task == "question-answering" else ("logits",)
    for name in names:
        assert max_diff(getattr(flax_out, name), getattr(torch_out, name)) <= 1e-5, name


@pytest.mark.slow
def test_masked_lm_choice_scoring_trains_predicts_and_exports(space, torch):
    """--choice-scoring masked-lm: the choices scored by the LM head at the context's <mask>; the run trains,
    its test metrics are sklearn's, --predict gives its predictions, and the HF masked-LM export gives the
    same scores in transformers (computed here from its logits)."""
    transformers = pytest.importorskip("transformers")
    from train.finetune_eval import Predictor

    folder = space["root"] / "tasks" / "multiple-choice"
    # evaluated on its training records: a tiny random model fits them in 24 steps (the loss that must fall)
    out = run_task(
        space, "multiple-choice", "--choice-scoring", "masked-lm", "--validation", str(folder / "train.jsonl")
    )
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "eval"]
    assert evals[-1]["loss"] < 0.9 * evals[0]["loss"], [e["loss"] for e in evals]
    results = json.loads((out / "eval_results.json").read_text())
    predictions = read_jsonl(out / "predictions.jsonl")
    assert results["test"]["accuracy"] == pytest.approx(
        rescore("multiple-choice", read_jsonl(folder / "test.jsonl"), predictions)["accuracy"], abs=1e-12
    )
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["finetuning"]["choice_scoring"] == "masked-lm"
    assert config["architectures"] == ["LongformerForMaskedLM"]

    predictor = Predictor(out / "best")
    again, enc, _ = predictor.predict(fd.read_records(folder, "test"))
    assert [p["prediction"] for p in again] == [p["prediction"] for p in predictions]
    assert max_diff(np.array([p["scores"] for p in again]), np.array([p["scores"] for p in predictions])) <= 1e-6

    a = {k: v[:4] for k, v in enc.arrays.items()}
    flax_logits = predictor.model.apply(
        {"params": predictor.params},
        **{k: a[k] for k in ("input_ids", "attention_mask", "global_attention_mask", "masked_positions")},
    ).logits[:, 0]
    flax_scores = np.asarray(lj_choice_scores(flax_logits, a["choice_ids"], a["choice_mask"]))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        torch_logits = hf(
            **{
                k: torch.tensor(np.asarray(a[k]), dtype=torch.long)
                for k in ("input_ids", "attention_mask", "global_attention_mask")
            }
        ).logits.numpy()
    at = torch_logits[np.arange(4), a["masked_positions"][:, 0]]
    assert max_diff(flax_logits, at) <= 1e-5
    log_probs = at - np.log(np.exp(at - at.max(-1, keepdims=True)).sum(-1, keepdims=True)) - at.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs[:, None, :], a["choice_ids"], axis=-1)
    torch_scores = (picked * a["choice_mask"]).sum(-1) / a["choice_mask"].sum(-1)
    assert max_diff(flax_scores, torch_scores) <= 1e-5
    best = int(np.argmax(torch_scores[0]))
    assert again[0]["prediction"] == best


# ----------------------------------------------------------------------------------------------- bad input
def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _error(capsys, argv) -> str:
    assert finetune.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_bad_input_is_one_error_line_and_touches_nothing(space, capsys, tmp_path):
    out = run_task(space, "document-classification")
    before = _snapshot(out)
    folder = space["root"] / "tasks" / "document-classification"
    base = finetune_args("document-classification", folder, space["base"], out, *EXTRA["document-classification"])

    def bad(rows, name="bad.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    good = read_jsonl(folder / "validation.jsonl")
    cases = {
        "label 'wine' is not one of the 3 labels": [
            "--validation",
            bad([*good, {"id": "w", "text": "Wine.", "label": "wine"}], "w.jsonl"),
        ],
        "field 'text' is empty": ["--validation", bad([{"id": "e", "text": " ", "label": "food"}], "e.jsonl")],
        "no field 'label' (fields: ['id', 'text']); add it, or name the field that holds it with --label-field": [
            "--validation",
            bad([{"id": "m", "text": "Bread."}], "m.jsonl"),
        ],
        "holds checkpoints of a different run": ["--learning-rate", "5e-3"],
        "differ from those of the checkpoint": ["--init", str(out), "--labels", bad([], "l.txt")],
    }
    (tmp_path / "l.txt").write_text("food\nwine\n")
    for want, extra in cases.items():
        assert want in _error(capsys, base + extra), want
    qa = write_task(tmp_path, "question-answering")
    row = read_jsonl(qa / "train.jsonl")[0]
    row["answers"] = {"text": ["nowhere"], "answer_start": [3]}
    (qa / "validation.jsonl").write_text(json.dumps(row) + "\n")
    msg = _error(capsys, finetune_args("question-answering", qa, space["base"], tmp_path / "qa-run"))
    assert "answer 'nowhere' is not in its context" in msg and not (tmp_path / "qa-run").exists()
    assert _snapshot(out) == before


def test_truncation_is_reported(space):
    out = run_task(space, "document-classification")
    results = json.loads((out / "eval_results.json").read_text())
    cut = results["truncation"]["train"]["document longer than 64 tokens: cut"]
    assert cut["records"] > 0 and cut["tokens_dropped"] > cut["records"]


def test_options_are_checked(capsys):
    assert "task='nope'" in _error(capsys, ["--task", "nope", "--init", "x", "--data", "y"])
    assert "--data is required" in _error(capsys, ["--init", "x"])
    assert "pooling='mean'" in _error(capsys, ["--pooling", "mean", "--init", "x", "--data", "y"])
    assert "--choice-scoring masked-lm applies to multiple choice, not document-classification" in _error(
        capsys, ["--choice-scoring", "masked-lm", "--init", "x", "--data", "y"]
    )
