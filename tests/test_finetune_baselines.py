"""The bag-of-words baselines of the fine-tuning tasks (bench/finetune_baselines.py)."""

import json
import os
import random

import pytest

from bench import finetune_baselines as fb

pytest.importorskip("sklearn")


def test_scores_by_hand():
    sc = fb.scores(["a", "a", "b", "c"], ["a", "b", "b", "c"])
    assert sc["accuracy"] == pytest.approx(0.75)
    assert sc["micro_f1"] == pytest.approx(0.75)
    # F1: a 2/3 (precision 1, recall 1/2), b 2/3 (1/2, 1), c 1
    assert sc["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_scores_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(1)
    for n_labels in (2, 5, 9):
        y_true = [rng.choice("abcdefghi"[:n_labels]) for _ in range(50)]
        y_pred = [rng.choice("abcdefghi"[: n_labels + 1]) for _ in range(50)]  # a label never true, too
        sc = fb.scores(y_true, y_pred)
        assert sc["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
        assert sc["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"), abs=1e-12)
        assert sc["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)


def test_chance_levels():
    ch = fb.chance(["x", "x", "y"], ["x", "y", "y", "y"] * 100, ["x", "y", "z", "w"])
    assert ch["majority"]["accuracy"] == pytest.approx(0.25)  # always "x", the train split's majority
    assert ch["uniform"]["accuracy"] == pytest.approx(0.25, abs=0.02)


def _write(task_dir, records_by_split, labels=None):
    os.makedirs(task_dir)
    for split, records in records_by_split.items():
        with open(os.path.join(task_dir, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    if labels:
        with open(os.path.join(task_dir, "labels.txt"), "w") as f:
            f.writelines(label + "\n" for label in labels)


def _synthetic_tasks(root):
    """Four tasks whose answers a bag of words finds: a keyword decides every label."""
    rng = random.Random(0)
    filler = [f"w{i}" for i in range(200)]
    keys = {"red": "apple cherry", "blue": "sky ocean"}

    def words(k):
        return " ".join(rng.choice(filler) for _ in range(k))

    sizes = {"train": 40, "validation": 10, "test": 10}
    doc, seq, mc, qa = {}, {}, {}, {}
    for split, n in sizes.items():
        doc[split] = [
            {
                "id": f"{split}{i}",
                "document": f"{split}{i}",
                "label": lab,
                "text": f"{words(10)} {keys[lab]} {words(5)} {keys[lab]} {words(10)}",
            }
            for i in range(n)
            for lab in [("red", "blue")[i % 2]]
        ]
        seq[split] = []
        for i in range(n):
            labs = [("red", "blue")[(i + j) % 2] for j in range(6)]
            seq[split].append(
                {
                    "id": f"{split}{i}",
                    "document": f"{split}{i}",
                    "labels": labs,
                    "text": [f"{words(5)} {keys[lab]} {words(5)}" for lab in labs],
                }
            )
        mc[split] = []
        for i in range(n):
            topic = f"t{split}{i}a t{split}{i}b t{split}{i}c"
            choices = [f"{topic} {words(4)}"] + [f"{words(4)} o{split}{i}x{j} o{split}{i}y{j}" for j in range(3)]
            label = i % 4
            choices.insert(label, choices.pop(0))
            mc[split].append(
                {
                    "id": f"{split}{i}",
                    "document": f"{split}{i}",
                    "choices": choices,
                    "label": label,
                    "text": f"{words(40)} {topic} <mask> {topic} {words(40)}",
                }
            )
        qa[split] = []
        for i in range(n):
            entries = [(f"f{j}", f"Does thing t{i}q{j} with item u{i}v{j} here.") for j in range(5)]
            text = "\n\n".join(f"{name}(x)\n{doc_line}" for name, doc_line in entries)
            j = i % 5
            start = text.index(f"f{j}(x)")
            qa[split].append(
                {
                    "id": f"{split}{i}",
                    "document": f"{split}{i}",
                    "text": text,
                    "question": entries[j][1],
                    "answer": f"f{j}",
                    "answer_start": start,
                }
            )
    _write(os.path.join(root, "doc"), doc, ["red", "blue"])
    _write(os.path.join(root, "seq"), seq, ["red", "blue"])
    _write(os.path.join(root, "mc"), mc)
    _write(os.path.join(root, "qa"), qa)


def _rows(md):
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[1] in ("validation", "test"):
            rows[(cells[0], cells[1], cells[3].split(" (")[0])] = cells[4:]
    return rows


def test_baselines_end_to_end(tmp_path, capsys):
    _synthetic_tasks(str(tmp_path))
    assert fb.main([str(tmp_path)]) == 0
    md = (tmp_path / "baselines.md").read_text()
    assert md in capsys.readouterr().out
    rows = _rows(md)
    for split in ("validation", "test"):
        assert rows[("doc", split, "bag-of-words")] == ["1.000", "1.000", "1.000"]
        assert rows[("doc", split, "majority")][0] == "0.500"
        assert rows[("seq", split, "bag-of-words")] == ["1.000", "1.000", "1.000"]
        assert ("seq", split, "bag-of-words + position") in rows
        assert rows[("mc", split, "bag-of-words similarity")] == ["1.000", "", ""]
        assert rows[("mc", split, "uniform")] == ["0.250", "", ""]
        assert rows[("qa", split, "bag-of-words similarity")] == ["1.000", "", ""]
        assert rows[("qa", split, "uniform")][0] == "0.200"  # one of 5 entries


def test_task_kind_and_bad_input(tmp_path, capsys):
    assert fb.task_kind({"text": "t", "label": "x"}) == "document"
    assert fb.task_kind({"text": ["a"], "labels": ["x"]}) == "sequence"
    assert fb.task_kind({"text": "t", "choices": ["a"], "label": 0}) == "choice"
    assert fb.task_kind({"text": "t", "question": "q", "answer": "a", "answer_start": 0}) == "extractive"
    with pytest.raises(ValueError, match="none of the fields"):
        fb.task_kind({"id": "x", "text": "t"})
    assert fb.main([str(tmp_path / "absent")]) == 2
    assert "python -m train.demo_tasks" in capsys.readouterr().err
    assert fb.main([str(tmp_path)]) == 2  # no task folder in it
    assert "holds no task folder" in capsys.readouterr().err
    _write(str(tmp_path / "broken"), {"train": [{"id": "a", "document": "a", "text": "t", "label": "x"}]})
    assert fb.main([str(tmp_path)]) == 2
    assert "has no validation.jsonl" in capsys.readouterr().err
