"""Fine-tuning data (train/finetune_data.py): readers, labels, the layout of every task, truncation, bad records."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from longformer_jax.losses import IGNORE_INDEX
from tests.finetune_fixtures import BLOCK, LABELS, SEQ_LEN, build_base_model, sentence, write_task
from train import data as data_lib
from train import finetune_data as fd


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftdata")
    build_base_model(root)
    return data_lib.load_tokenizer(str(root / "tokenizer"))


def layout(tok, kind="blocks", seq_len=SEQ_LEN, block=BLOCK):
    return fd.Layout(kind, seq_len, block, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def encode(
    tok, task, rows, kind="blocks", labels=LABELS, multi=False, fields=fd.Fields(), targets=True, scoring="cls", **kw
):
    enc = fd.TaskEncoder(
        task, tok, layout(tok, kind, **kw), fields, fd.LabelSet(tuple(labels)) if labels else None, multi, scoring
    )
    return enc.encode(fd.Records(rows, "records"), "train", targets), enc


# ----------------------------------------------------------------------------------------------- readers
def test_readers_agree(tmp_path):
    rows = [
        {"id": "a", "text": ["one", "two"], "labels": ["x", "y"], "n": 1},
        {"id": "b", "text": ["three"], "labels": ["y"], "n": 2},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.json").write_text(json.dumps(rows))
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet")
    with open(tmp_path / "r.csv", "w") as f:
        f.write("id,text,labels,n\n")
        for r in rows:
            f.write(
                f'{r["id"]},"{json.dumps(r["text"]).replace(chr(34), chr(34) * 2)}",'
                f'"{json.dumps(r["labels"]).replace(chr(34), chr(34) * 2)}",{r["n"]}\n'
            )
    for name in ("r.jsonl", "r.json", "r.parquet"):
        assert fd.read_records(tmp_path / name).rows == rows, name
    csv_rows = fd.read_records(tmp_path / "r.csv").rows
    assert [{k: v for k, v in r.items() if k != "n"} for r in csv_rows] == [
        {k: v for k, v in r.items() if k != "n"} for r in rows
    ]


def test_task_folder_and_errors(tmp_path):
    folder = write_task(tmp_path, "document-classification", 6, 3)
    files = fd.task_folder_files(folder)
    assert files["labels"].name == "labels.txt" and files["test"].name == "test.jsonl"
    assert len(fd.read_records(folder, "validation").rows) == 3
    with pytest.raises(fd.DataError, match="does not exist"):
        fd.read_records(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(fd.DataError, match="bad.jsonl:2"):
        fd.read_records(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(fd.DataError, match="holds no records"):
        fd.read_records(tmp_path / "empty.jsonl")


def test_label_sets(tmp_path):
    assert fd.LabelSet.from_values([3, 1, 2, 1]).names == ("1", "2", "3")
    assert fd.LabelSet.from_values(["b", "a"]).names == ("a", "b")
    (tmp_path / "l.txt").write_text("x\ny\n\n")
    labels = fd.LabelSet.from_file(tmp_path / "l.txt")
    assert labels.names == ("x", "y") and labels.index("y", "here") == 1
    with pytest.raises(fd.DataError, match="label 'z' is not one of the 2 labels"):
        labels.index("z", "record 3")
    with pytest.raises(fd.DataError, match="more than once"):
        fd.LabelSet(("a", "a"))


# ----------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("kind", ["blocks", "contiguous"])
def test_layout_places_blocks_where_it_says(tok, kind):
    lay = layout(tok, kind)
    parts = [[[10, 11, 12]], [[20, 21], [22, 23, 24, 25]]]
    ex, offsets = lay.example(parts, global_parts=[0])
    ids = ex["input_ids"]
    for part, offs in zip(parts, offsets):
        for block, start in zip(part, offs):
            assert ids[start : start + len(block)].tolist() == block
            if kind == "blocks":
                assert start % BLOCK == 1 and ids[start - 1] in (tok.bos_token_id, tok.eos_token_id)
    gm = ex["global_attention_mask"]
    assert gm[offsets[0][0] : offsets[0][0] + 3].tolist() == [1, 1, 1]
    if kind == "blocks":
        assert gm[::BLOCK].tolist() == [1, 1, 1, 0] and ex["attention_mask"][3 * BLOCK :].sum() == 0
    else:
        assert ids[:1].tolist() == [tok.bos_token_id] and ids[4:6].tolist() == [tok.eos_token_id] * 2
        assert ex["attention_mask"].sum() == 1 + 3 + 2 + 6 + 1  # <s> A </s></s> B </s>


def test_document_truncation_is_counted(tok):
    rows = [
        {"text": " ".join(sentence(random.Random(i), "food") for _ in range(20)), "label": "food"} for i in range(3)
    ] + [{"text": "Short food.", "label": "food"}]
    enc, encoder = encode(tok, "document-classification", rows)
    assert enc.arrays["input_ids"].shape == (4, SEQ_LEN)
    assert encoder.report.counts[f"document longer than {SEQ_LEN} tokens: cut"] == 3
    assert encoder.report.tokens[f"document longer than {SEQ_LEN} tokens: cut"] > 100
    assert "3 of 4 records" in encoder.report.lines(4, "train")[0]
    assert enc.arrays["labels"].tolist() == [2, 2, 2, 2]


def test_pair_goes_in_the_last_block(tok):
    rows = [
        {
            "text": " ".join(sentence(random.Random(0), "food") for _ in range(20)),
            "hyp": "Soup is salty.",
            "label": "music",
        }
    ]
    enc, _ = encode(tok, "document-classification", rows, fields=fd.Fields(pair="hyp"))
    ids = enc.arrays["input_ids"][0]
    hyp = tok("Soup is salty.", add_special_tokens=False)["input_ids"]
    last = (SEQ_LEN // BLOCK - 1) * BLOCK
    assert ids[last + 1 : last + 1 + len(hyp)].tolist() == hyp and ids[last] == tok.eos_token_id


def test_multi_label_targets(tok):
    rows = [{"text": "Ball goal.", "labels": ["food", "sports"]}, {"text": "Song.", "labels": []}]
    enc, _ = encode(tok, "document-classification", rows, multi=True)
    assert enc.arrays["labels"].tolist() == [[1, 0, 1], [0, 0, 0]]
    with pytest.raises(fd.DataError, match="label set"):
        encode(tok, "document-classification", [{"text": "x", "labels": "food"}], multi=True)


def test_sequential_sentences_every_block_once(tok):
    labels = [LABELS[i % 3] for i in range(11)]
    rows = [{"id": "p", "text": [f"Block {i} ball." for i in range(11)], "labels": labels}]
    enc, encoder = encode(tok, "sequential-sentence-classification", rows)
    n = SEQ_LEN // BLOCK
    assert len(enc) == 3 and enc.positions.shape == (3, n)
    seen = enc.positions[enc.positions >= 0]
    assert sorted(seen.tolist()) == list(range(11))
    want = np.asarray([LABELS.index(lab) for lab in labels])
    got = enc.arrays["labels"][enc.positions >= 0]
    assert got.tolist() == want[seen].tolist()
    assert (enc.arrays["labels"][enc.positions < 0] == IGNORE_INDEX).all()
    assert encoder.report.counts["more than 4 blocks: split into windows of 4 blocks"] == 1
    with pytest.raises(fd.DataError, match="one label per block"):
        encode(tok, "sequential-sentence-classification", [{"text": ["a", "b"], "labels": ["food"]}])
    with pytest.raises(fd.DataError, match="needs --layout blocks"):
        encode(tok, "sequential-sentence-classification", rows, kind="contiguous")


def gap_context(seed: int) -> str:
    """Ten food sentences, ``<mask>``, ten music sentences: longer than the input, the gap in the middle."""
    rng = random.Random(seed)
    return " <mask> ".join(" ".join(sentence(rng, topic) for _ in range(10)) for topic in ("food", "music"))


@pytest.mark.parametrize("kind", ["blocks", "contiguous"])
def test_multiple_choice_keeps_the_mask(tok, kind):
    context = gap_context(0)
    rows = [{"text": context, "choices": ["Bread salt.", "Song note.", "Goal ball."], "label": 1}]
    enc, encoder = encode(tok, "multiple-choice", rows, kind=kind, labels=None)
    ids = enc.arrays["input_ids"]
    assert ids.shape == (1, 3, SEQ_LEN) and enc.arrays["labels"].tolist() == [1]
    assert (ids[0] == tok.mask_token_id).sum(-1).tolist() == [1, 1, 1]
    choice = tok("Song note.", add_special_tokens=False)["input_ids"]
    row = ids[0, 1][enc.arrays["attention_mask"][0, 1] == 1].tolist()
    assert row[-len(choice) - (1 if kind == "contiguous" else 0) :][: len(choice)] == choice
    assert "cut around <mask>" in encoder.report.lines(1, "train")[0]
    gm = enc.arrays["global_attention_mask"][0, 1]
    assert gm[np.nonzero(ids[0, 1] == choice[0])[0][-1]] == 1  # the choice global
    if kind == "blocks":  # every block start global, <s> included (the pretraining layout)
        assert gm[::BLOCK].tolist() == [1, 1, 1, 1]
    else:  # transformers' rule: <s> local
        assert gm[0] == 0
    with pytest.raises(fd.DataError, match="not the index of one of its 3 choices"):
        encode(tok, "multiple-choice", [{**rows[0], "label": 3}], labels=None)


@pytest.mark.parametrize("kind", ["blocks", "contiguous"])
def test_masked_lm_choice_scoring_is_one_row_around_the_mask(tok, kind):
    context = gap_context(1)
    choices = ["Bread salt.", "Song note played twice.", "Goal ball."]
    rows = [{"text": context, "choices": choices, "question": "Which one?", "label": 2}]
    enc, encoder = encode(tok, "multiple-choice", rows, kind=kind, labels=None, scoring="masked-lm")
    a = enc.arrays
    assert a["input_ids"].shape == (1, SEQ_LEN) and a["labels"].tolist() == [2]
    (position,) = a["masked_positions"][0]
    assert a["input_ids"][0, position] == tok.mask_token_id and (a["input_ids"][0] == tok.mask_token_id).sum() == 1
    assert a["choice_ids"].shape == a["choice_mask"].shape == (1, 3, BLOCK - 1)
    for i, c in enumerate(choices):  # each choice's tokens as they follow a space (the <mask> takes the space)
        want = tok(" " + c, add_special_tokens=False)["input_ids"][: BLOCK - 1]
        assert a["choice_ids"][0, i][a["choice_mask"][0, i] == 1].tolist() == want
        assert a["choice_mask"][0, i].sum() == len(want) and not a["choice_ids"][0, i][len(want) :].any()
    question = tok("Which one?", add_special_tokens=False)["input_ids"]
    row = a["input_ids"][0].tolist()
    start = next(i for i in range(SEQ_LEN) if row[i : i + len(question)] == question)
    assert a["global_attention_mask"][0, start : start + len(question)].tolist() == [1] * len(question)
    report = " ".join(encoder.report.lines(1, "train"))
    assert "context longer than the input: cut around <mask>" in report and "choice longer than a block" in report
    with pytest.raises(fd.DataError, match="this context has none: put it where the answer goes"):
        encode(tok, "multiple-choice", [{**rows[0], "text": "No gap here."}], labels=None, scoring="masked-lm")
    with pytest.raises(fd.DataError, match="choice_scoring='masked-lm'"):
        encode(tok, "document-classification", [{"text": "x", "label": "food"}], scoring="masked-lm")


@pytest.mark.parametrize("kind", ["blocks", "contiguous"])
def test_question_answering_windows_point_at_the_answer(tok, kind):
    rng = random.Random(1)
    filler = " ".join(sentence(rng, "sports") for _ in range(12))
    context = f"{filler} The gold one is cheese. {filler}"
    start = context.index("cheese")
    rows = [
        {
            "id": "q",
            "question": "Which is the gold one?",
            "context": context,
            "answers": {"text": ["cheese"], "answer_start": [start]},
        }
    ]
    enc, _ = encode(tok, "question-answering", rows, kind=kind, labels=None)
    assert len(enc) > 1 and enc.contexts == [context] and enc.gold == [["cheese"]]
    s, e = enc.arrays["start_positions"], enc.arrays["end_positions"]
    positive = np.nonzero(s > 0)[0]
    assert len(positive) >= 1 and (s[s == 0] == e[s == 0]).all()
    for w in positive:
        a, b = enc.positions[w][s[w]][0], enc.positions[w][e[w]][1]
        assert context[a:b].strip() == "cheese"
    q = tok("Which is the gold one?", add_special_tokens=False)["input_ids"]
    gm = enc.arrays["global_attention_mask"][0]
    assert gm[: 1 + len(q)].tolist() == [1] * (1 + len(q))  # <s> and the question are global
    kept = fd.limit_negative_windows(enc, 1, 0)
    assert len(kept) == len(positive) + 1 and (kept.arrays["start_positions"] > 0).sum() == len(positive)


def test_question_answering_bad_answers(tok):
    row = {
        "question": "Which?",
        "context": "The red one is salt.",
        "answers": {"text": ["sugar"], "answer_start": [15]},
    }
    with pytest.raises(fd.DataError, match="answer 'sugar' is not in its context at answer_start 15"):
        encode(tok, "question-answering", [row], labels=None)
    with pytest.raises(fd.DataError, match="unanswerable"):
        encode(tok, "question-answering", [{**row, "answers": {"text": [], "answer_start": []}}], labels=None)
    enc, _ = encode(tok, "question-answering", [{**row, "answer": "salt", "answers": None}], labels=None)
    assert enc.gold == [["salt"]]
    enc, _ = encode(tok, "question-answering", [{"question": "Which?", "context": "x y"}], labels=None, targets=False)
    assert enc.gold == [None] and (enc.arrays["start_positions"] == IGNORE_INDEX).all()


def test_token_classification_labels_first_subtokens(tok):
    words = ["Guitar", "is", "supercalifragilistic", "bread", "."] * 6
    tags = [("music" if w == "Guitar" else "food" if w == "bread" else "O") for w in words]
    enc, encoder = encode(tok, "token-classification", [{"text": words, "labels": tags}], labels=["O", *LABELS])
    pos, lab = enc.positions, enc.arrays["labels"]
    assert sorted(pos[pos >= 0].tolist()) == list(range(len(words)))
    names = ["O", *LABELS]
    assert [names[v] for v in lab[pos >= 0]] == [tags[w] for w in pos[pos >= 0]]
    ids = enc.arrays["input_ids"]
    for w_ex, w_pos in zip(*np.nonzero(pos >= 0)):
        word = words[pos[w_ex, w_pos]]
        first = tok(" " + word if pos[w_ex, w_pos] else word, add_special_tokens=False)["input_ids"][0]
        assert ids[w_ex, w_pos] == first
    assert (lab[pos < 0] == IGNORE_INDEX).all() and len(enc) > 1
    assert encoder.report.counts["more words than fit: split into windows"] == 1


def test_bad_records(tok):
    with pytest.raises(fd.DataError, match="field 'text' is empty"):
        encode(tok, "document-classification", [{"text": "  ", "label": "food"}])
    with pytest.raises(fd.DataError, match="no field 'label'"):
        encode(tok, "document-classification", [{"text": "Bread."}])
    with pytest.raises(fd.DataError, match="label 'wine' is not one of the 3 labels"):
        encode(tok, "document-classification", [{"text": "Bread.", "label": "wine"}])
    with pytest.raises(fd.DataError, match="id 'a' appears more than once"):
        encode(tok, "document-classification", [{"id": "a", "text": "x", "label": "food"}] * 2)
    with pytest.raises(fd.DataError, match="different numbers of choices"):
        encode(
            tok,
            "multiple-choice",
            [{"text": "x", "choices": ["a", "b"], "label": 0}, {"text": "y", "choices": ["a", "b", "c"], "label": 0}],
            labels=None,
        )
    enc, _ = encode(tok, "document-classification", [{"text": "Bread."}], targets=False)
    assert enc.gold == [None] and enc.arrays["labels"].tolist() == [IGNORE_INDEX]


def test_batches(tok):
    rows = [{"text": f"Bread {i}.", "label": "food"} for i in range(5)]
    enc, _ = encode(tok, "document-classification", rows)
    batches = fd.eval_batches(enc.arrays, 4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4]
    assert batches[1]["labels"].tolist() == [2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    it = fd.train_iterator(enc.arrays, 2, seed=3)
    first = [next(it)["input_ids"] for _ in range(3)]
    state = it.get_state()
    later = next(it)["input_ids"]
    it2 = fd.train_iterator(enc.arrays, 2, seed=3)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["input_ids"], later)
    assert len({row.tobytes() for b in first for row in b}) >= 4  # shuffled, the epoch goes on
