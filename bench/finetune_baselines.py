"""Bag-of-words baselines for the fine-tuning tasks: ``python -m bench.finetune_baselines DIR``.

``DIR`` holds task folders in the format of ``train/demo_tasks.py`` (``python -m train.demo_tasks
--output DIR``). For each task this trains a scikit-learn bag-of-words logistic regression on the
train split (its regularisation ``C`` chosen on validation) and reports accuracy, micro-F1 and
macro-F1 on validation and test, beside two chance levels: *majority* (the train split's most
frequent label, always) and *uniform* (a label drawn uniformly, averaged over 100 seeded draws;
for question answering, a candidate entry drawn uniformly, in expectation). The table is printed
and written to ``DIR/baselines.md``. The task type is read from the records' fields:

- ``label`` a string -> document classification: tf-idf of the document's words (unigrams and
  bigrams, sublinear term frequency), multinomial logistic regression;
- ``labels`` a list -> sequential sentence classification: each block from its own words
  (*bag-of-words*), and the same plus its position in the document (*+ position*: ten bins of the
  block's relative position, and first block or not);
- ``choices`` -> multiple choice: each candidate gets the tf-idf cosine similarity with the 25 and
  the 100 words on each side of ``<mask>`` and with the whole context, plus its length in words; a
  logistic regression on those (true candidate against the others) scores the candidates, the best
  wins. Accuracy only (micro-F1 and macro-F1 are left empty);
- ``question`` -> extractive question answering: the candidates are the entries of the page (a
  line starting ``name(``); the one whose text (up to the next entry) has the highest tf-idf cosine
  similarity with the question is the answer (nothing is learned but the idf). Accuracy = exact
  span match.

The similarity baselines hash their words and word pairs (idf from the train split), so that the words of
held-out documents, unseen in training, still count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter

import numpy as np

SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")
C_GRID = (0.1, 1.0, 10.0, 100.0)
UNIFORM_DRAWS = 100
MASK = "<mask>"
_ENTRY_RE = re.compile(r"(?m)^([A-Za-z_][A-Za-z0-9_]*)\(")
_WORD_RE = re.compile(r"\S+")


def load_task(task_dir: str) -> dict[str, list[dict]]:
    """The records of ``task_dir/{train,validation,test}.jsonl``."""
    splits = {}
    for split in SPLITS:
        path = os.path.join(task_dir, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{task_dir} has no {split}.jsonl; build the tasks with `python -m train.demo_tasks`")
        with open(path, encoding="utf-8") as f:
            splits[split] = [json.loads(line) for line in f if line.strip()]
        if not splits[split]:
            raise ValueError(f"{path} holds no records")
    return splits


def task_kind(record: dict) -> str:
    """'choice', 'extractive', 'sequence' or 'document', from a record's fields."""
    if "choices" in record:
        return "choice"
    if "question" in record:
        return "extractive"
    if isinstance(record.get("labels"), list):
        return "sequence"
    if isinstance(record.get("label"), str):
        return "document"
    raise ValueError(f"record {record.get('id')!r} has none of the fields choices/question/labels/label")


def scores(y_true: list, y_pred: list) -> dict[str, float]:
    """Accuracy, micro-F1 and macro-F1 (over the labels that occur in y_true or y_pred), as scikit-learn's
    ``accuracy_score`` and ``f1_score(average=..., zero_division=0)`` compute them."""
    names = sorted(set(y_true) | set(y_pred), key=str)
    index = {name: i for i, name in enumerate(names)}
    t = np.array([index[v] for v in y_true])
    p = np.array([index[v] for v in y_pred])
    return _scores_of_indices(t, p[None, :], len(names))[0]


def _scores_of_indices(t: np.ndarray, p: np.ndarray, k: int) -> list[dict[str, float]]:
    """Scores of each row of predictions ``p`` (draws, n) against ``t`` (n,), labels 0..k-1; a label
    in neither the truth nor a row's predictions does not count in that row's macro-F1."""
    rows = np.arange(p.shape[0])[:, None]
    hit = p == t[None, :]
    tp = np.zeros((p.shape[0], k))
    np.add.at(tp, (rows, p), hit.astype(float))
    predicted = np.stack([np.bincount(r, minlength=k) for r in p]).astype(float)
    true = np.bincount(t, minlength=k).astype(float)[None, :]
    denominator = predicted + true
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    present = denominator > 0
    macro = (f1 * present).sum(axis=1) / present.sum(axis=1)
    accuracy = hit.mean(axis=1)
    return [{"accuracy": float(a), "micro_f1": float(a), "macro_f1": float(m)} for a, m in zip(accuracy, macro)]


def chance(train_y: list, eval_y: list, labels: list) -> dict[str, dict[str, float]]:
    """Majority (the train split's most frequent label) and uniform (mean of seeded draws) scores."""
    majority = Counter(train_y).most_common(1)[0][0]
    names = sorted(set(labels) | set(eval_y), key=str)
    index = {name: i for i, name in enumerate(names)}
    draws = np.random.default_rng(0).choice([index[v] for v in labels], (UNIFORM_DRAWS, len(eval_y)))
    per_draw = _scores_of_indices(np.array([index[v] for v in eval_y]), draws, len(names))
    uniform = {key: float(np.mean([d[key] for d in per_draw])) for key in per_draw[0]}
    return {"majority": scores(eval_y, [majority] * len(eval_y)), "uniform": uniform}


def _fit_best(x: dict, y: dict, make_model) -> object:
    """The model of ``C_GRID`` with the best validation accuracy (ties: the smaller C)."""
    best, best_acc = None, -1.0
    for c in C_GRID:
        model = make_model(c).fit(x["train"], y["train"])
        acc = float(np.mean(model.predict(x["validation"]) == np.asarray(y["validation"])))
        if acc > best_acc:
            best, best_acc = model, acc
    return best


def _logistic(c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=3000)


def _vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2, token_pattern=r"(?u)\b\w+\b")


def _open_vocabulary_tfidf():
    """tf-idf over hashed words: a word unseen in the train split still counts (with the largest idf)."""
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.pipeline import make_pipeline

    hashing = HashingVectorizer(
        n_features=2**20, alternate_sign=False, norm=None, ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b"
    )
    return make_pipeline(hashing, TfidfTransformer(sublinear_tf=True))


def document_rows(splits: dict[str, list[dict]], labels: list[str]) -> list[tuple]:
    vec = _vectorizer().fit([r["text"] for r in splits["train"]])
    x = {s: vec.transform([r["text"] for r in splits[s]]) for s in SPLITS}
    y = {s: [r["label"] for r in splits[s]] for s in SPLITS}
    model = _fit_best(x, y, _logistic)
    rows = []
    for split in EVAL_SPLITS:
        for name, sc in chance(y["train"], y[split], labels).items():
            rows.append((split, len(y[split]), name, sc))
        predicted = list(model.predict(x[split]))
        rows.append((split, len(y[split]), f"bag-of-words (C={model.C:g})", scores(y[split], predicted)))
    return rows


def _position_features(records: list[dict]):
    from scipy import sparse

    rows = []
    for r in records:
        n = len(r["text"])
        for i in range(n):
            feat = np.zeros(11, np.float32)
            feat[min(9, int(10 * i / n))] = 1.0
            feat[10] = float(i == 0)
            rows.append(feat)
    return sparse.csr_matrix(np.stack(rows))


def sequence_rows(splits: dict[str, list[dict]], labels: list[str]) -> list[tuple]:
    from scipy import sparse

    blocks = {s: [b for r in splits[s] for b in r["text"]] for s in SPLITS}
    y = {s: [lab for r in splits[s] for lab in r["labels"]] for s in SPLITS}
    vec = _vectorizer().fit(blocks["train"])
    x_text = {s: vec.transform(blocks[s]) for s in SPLITS}
    x_pos = {s: sparse.hstack([x_text[s], _position_features(splits[s])]).tocsr() for s in SPLITS}
    models = {
        "bag-of-words": (_fit_best(x_text, y, _logistic), x_text),
        "bag-of-words + position": (_fit_best(x_pos, y, _logistic), x_pos),
    }
    rows = []
    for split in EVAL_SPLITS:
        for name, sc in chance(y["train"], y[split], labels).items():
            rows.append((split, len(y[split]), name, sc))
        for name, (model, x) in models.items():
            predicted = list(model.predict(x[split]))
            rows.append((split, len(y[split]), f"{name} (C={model.C:g})", scores(y[split], predicted)))
    return rows


def _gap_windows(context: str, sizes: tuple[int, ...]) -> list[str]:
    words = _WORD_RE.findall(context)
    at = next((i for i, w in enumerate(words) if MASK in w), len(words) // 2)
    return [" ".join(words[max(0, at - k) : at] + words[at + 1 : at + 1 + k]) for k in sizes] + [context]


def _choice_features(records: list[dict], vec) -> np.ndarray:
    """(examples, choices, 4): cosine with the 25- and 100-word windows and the context, log length."""
    feats = []
    for r in records:
        ctx = vec.transform(_gap_windows(r["text"], (25, 100)))
        cand = vec.transform(r["choices"])
        sim = (cand @ ctx.T).toarray()  # tf-idf rows are L2-normalised: cosine similarity
        length = np.log1p([len(c.split()) for c in r["choices"]])[:, None]
        feats.append(np.concatenate([sim, length], axis=1))
    return np.stack(feats).astype(np.float64)


def choice_rows(splits: dict[str, list[dict]]) -> list[tuple]:
    vec = _open_vocabulary_tfidf().fit(
        [r["text"] for r in splits["train"]] + [c for r in splits["train"] for c in r["choices"]]
    )
    f = {s: _choice_features(splits[s], vec) for s in SPLITS}
    y = {s: np.array([r["label"] for r in splits[s]]) for s in SPLITS}
    n_choices = f["train"].shape[1]

    def pick(model, s):
        return np.argmax(model.decision_function(f[s].reshape(-1, f[s].shape[-1])).reshape(-1, n_choices), axis=1)

    is_true = np.eye(n_choices)[y["train"]].reshape(-1)
    best, best_acc = None, -1.0
    for c in C_GRID:
        model = _logistic(c).fit(f["train"].reshape(-1, f["train"].shape[-1]), is_true)
        acc = float(np.mean(pick(model, "validation") == y["validation"]))
        if acc > best_acc:
            best, best_acc = model, acc
    rows = []
    for split in EVAL_SPLITS:
        majority = Counter(y["train"].tolist()).most_common(1)[0][0]
        rows.append((split, len(y[split]), "majority", {"accuracy": float(np.mean(y[split] == majority))}))
        rows.append((split, len(y[split]), "uniform", {"accuracy": 1.0 / n_choices}))
        acc = float(np.mean(pick(best, split) == y[split]))
        rows.append((split, len(y[split]), f"bag-of-words similarity (C={best.C:g})", {"accuracy": acc}))
    return rows


def _entries(text: str) -> list[tuple[int, str, str]]:
    """(start, name, passage) of every line of ``text`` that starts ``name(``."""
    found = [(m.start(), m.group(1)) for m in _ENTRY_RE.finditer(text)]
    ends = [s for s, _ in found[1:]] + [len(text)]
    return [(s, name, text[s:e]) for (s, name), e in zip(found, ends)]


def extractive_rows(splits: dict[str, list[dict]]) -> list[tuple]:
    vec = _open_vocabulary_tfidf().fit(list({r["document"]: r["text"] for r in splits["train"]}.values()))
    rows = []
    for split in EVAL_SPLITS:
        hits, inverse = [], []
        for r in splits[split]:
            entries = _entries(r["text"])
            sim = (vec.transform([p for _, _, p in entries]) @ vec.transform([r["question"]]).T).toarray()[:, 0]
            start, name, _ = entries[int(np.argmax(sim))]
            hits.append(start == r["answer_start"] and name == r["answer"])
            inverse.append(1.0 / len(entries))
        n = len(hits)
        rows.append((split, n, "uniform (an entry of the page)", {"accuracy": float(np.mean(inverse))}))
        rows.append((split, n, "bag-of-words similarity", {"accuracy": float(np.mean(hits))}))
    return rows


def task_rows(task_dir: str) -> list[tuple]:
    """(split, examples, method, scores) rows of one task folder."""
    splits = load_task(task_dir)
    kind = task_kind(splits["train"][0])
    labels_path = os.path.join(task_dir, "labels.txt")
    labels = None
    if os.path.isfile(labels_path):
        with open(labels_path, encoding="utf-8") as f:
            labels = [line.rstrip("\n") for line in f if line.strip()]
    if kind == "document":
        return document_rows(splits, labels or sorted({r["label"] for r in splits["train"]}))
    if kind == "sequence":
        return sequence_rows(splits, labels or sorted({lab for r in splits["train"] for lab in r["labels"]}))
    if kind == "choice":
        return choice_rows(splits)
    return extractive_rows(splits)


def _unit(task_dir: str) -> str:
    with open(os.path.join(task_dir, "train.jsonl"), encoding="utf-8") as f:
        kind = task_kind(json.loads(f.readline()))
    return {"sequence": "blocks", "choice": "questions", "extractive": "questions"}.get(kind, "documents")


def render(results: dict[str, list[tuple]], units: dict[str, str]) -> str:
    """The markdown table of every task's rows."""
    lines = [
        "| task | split | examples | method | accuracy | micro-F1 | macro-F1 |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for task, rows in results.items():
        for split, n, method, sc in rows:
            cells = [f"{sc[k]:.3f}" if k in sc else "" for k in ("accuracy", "micro_f1", "macro_f1")]
            lines.append(f"| {task} | {split} | {n:,} {units[task]} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.finetune_baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", help="directory of task folders (python -m train.demo_tasks --output DIR)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.dir):
        print(
            f"error: {args.dir!r} is not a directory; build the tasks first: "
            f"python -m train.demo_tasks --output {args.dir}",
            file=sys.stderr,
        )
        return 2
    tasks = sorted(d for d in os.listdir(args.dir) if os.path.isfile(os.path.join(args.dir, d, "train.jsonl")))
    if not tasks:
        print(
            f"error: {args.dir!r} holds no task folder (DIR/<task>/train.jsonl); build the tasks first: "
            f"python -m train.demo_tasks --output {args.dir}",
            file=sys.stderr,
        )
        return 2
    try:
        results = {t: task_rows(os.path.join(args.dir, t)) for t in tasks}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = render(results, {t: _unit(os.path.join(args.dir, t)) for t in tasks})
    report = f"Baselines of `python -m bench.finetune_baselines` on {args.dir}:\n\n{table}\n"
    with open(os.path.join(args.dir, "baselines.md"), "w", encoding="utf-8") as f:
        f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
