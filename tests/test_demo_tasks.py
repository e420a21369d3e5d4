"""The offline fine-tuning tasks (train/demo_tasks.py): files, fields, rules, splits, seeds, bad input."""

import json
import os
import re

import pytest

from train import demo_tasks as dt
from train.corpus import python_docs_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT_VALID = os.path.join(REPO, "..", "shared", "data", "wikitext-2", "valid.txt")

# Three chapters with 4+ pages each and some with fewer; pages with CLASSES, FUNCTIONS, PACKAGE CONTENTS.
MODULES = (
    "zlib",
    "gzip",
    "bz2",
    "lzma",
    "zipfile",  # Data Compression and Archiving
    "math",
    "cmath",
    "fractions",
    "random",
    "statistics",  # Numeric and Mathematical Modules
    "json",
    "json.decoder",
    "base64",
    "binascii",  # Internet Data Handling
    "itertools",
    "functools",
    "operator",
    "bisect",
    "heapq",
    "shlex",  # chapters with fewer pages
)
SMALL = {"document-classification": {"min_words": 50, "min_pages": 4}, "multiple-choice": {"per_article": 5}}


@pytest.fixture(scope="module")
def docs():
    return python_docs_corpus(modules=MODULES)


def _synthetic_wikitext(n_articles=10, n_sentences=30):
    """A WikiText-style file: articles of distinct, numbered sentences of 8-14 words."""
    out = []
    for a in range(n_articles):
        out.append(f" = Article {a} = \n \n")
        for p in range(n_sentences // 5):
            sents = []
            for s in range(5):
                k = p * 5 + s
                filler = " ".join(f"w{a}x{j}" for j in range(4 + (k % 6)))
                sents.append(f"Sentence {k} of article {a} says {filler} .")
            out.append(" " + " ".join(sents) + " \n")
        out.append(" \n = = Later = = \n \n")
        out.append(f" The end of article {a} is here with many words now .\n")
    return "".join(out)


def _read_split(path, split):
    with open(os.path.join(path, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _docs_by_split(task):
    return {s: {r["document"] for r in task.splits[s]} for s in dt.SPLITS}


def _assert_disjoint(task):
    by = _docs_by_split(task)
    assert by["train"] and by["validation"] and by["test"]
    assert not by["train"] & by["validation"]
    assert not by["train"] & by["test"]
    assert not by["validation"] & by["test"]


def test_library_chapter_rule():
    assert dt.library_chapter("gzip") == "Data Compression and Archiving"
    assert dt.library_chapter("asyncio.locks") == "Networking and Interprocess Communication"
    assert dt.library_chapter("xml.dom.minidom") == "Structured Markup Processing Tools"
    assert dt.library_chapter("xml.etree.ElementInclude") == "Structured Markup Processing Tools"  # via `xml`
    assert dt.library_chapter("email.mime.text") == "Internet Data Handling"
    assert dt.library_chapter("logging.handlers") == "Generic Operating System Services"
    assert dt.library_chapter("collections.abc") == "Data Types"
    assert dt.library_chapter("nturl2path") is None
    assert dt.library_chapter("gzipx") is None  # a prefix of a name is not a parent package


def test_document_classification_labels_splits_and_seed(docs):
    task = dt.document_classification(docs, 42, min_words=50, min_pages=4)
    assert task.labels == [  # the chapters with 4+ pages, in the Library Reference's order
        "Numeric and Mathematical Modules",
        "Data Compression and Archiving",
        "Internet Data Handling",
    ]
    records = [r for s in dt.SPLITS for r in task.splits[s]]
    assert {r["id"] for r in records} == {
        "zlib",
        "gzip",
        "bz2",
        "lzma",
        "zipfile",
        "math",
        "cmath",
        "fractions",
        "random",
        "statistics",
        "json",
        "json.decoder",
        "base64",
        "binascii",
    }
    text = dict(docs)
    for r in records:
        assert r["label"] == dt.library_chapter(r["id"])
        assert r["text"] == text[r["id"]]
    _assert_disjoint(task)
    for split in dt.SPLITS:  # drawn per label: every split holds every label
        assert {r["label"] for r in task.splits[split]} == set(task.labels)
    again = dt.document_classification(docs, 42, min_words=50, min_pages=4)
    assert again.splits == task.splits
    other = [dt.document_classification(docs, seed, min_words=50, min_pages=4) for seed in (1, 2, 3)]
    assert any(_docs_by_split(o) != _docs_by_split(task) for o in other)


def test_document_classification_rejects_too_few_pages(docs):
    with pytest.raises(ValueError, match="chapter"):
        dt.document_classification(docs, min_pages=50)
    with pytest.raises(ValueError, match="at least 3 pages"):
        dt.document_classification(docs, min_pages=2)


def test_pydoc_sections_and_blocks():
    page = (
        "NAME\nm - A module.\n\nDESCRIPTION\nIt does things. It is good.\n\nCLASSES\nclass A(builtins.object)\n"
        "A thing.\n\nFUNCTIONS\nf(x)\nReturn x.\n\nCLASSES not a heading here"
    )
    assert dt.pydoc_sections(page) == [
        ("NAME", "m - A module."),
        ("DESCRIPTION", "It does things. It is good."),
        ("CLASSES", "class A(builtins.object)\nA thing."),
        ("FUNCTIONS", "f(x)\nReturn x.\n\nCLASSES not a heading here"),
    ]
    assert dt.pydoc_sections("if\n\nThe if statement.") == []  # a language-reference topic
    long_para = " ".join(f"Word{i} is here." for i in range(50))  # 150 words, 50 sentences
    blocks = dt._blocks(long_para + "\n\nshort one", max_words=40)
    assert blocks[-1] == "short one"
    assert all(len(b.split()) <= 40 for b in blocks)
    assert " ".join(blocks[:-1]) == long_para  # cut at sentence ends, nothing lost


def test_sequential_sentence_classification(docs):
    task = dt.sequential_sentence_classification(docs, 42)
    assert task.labels == list(dt.PYDOC_SECTIONS)
    _assert_disjoint(task)
    order = {s: i for i, s in enumerate(dt.PYDOC_SECTIONS)}
    records = {r["id"]: r for s in dt.SPLITS for r in task.splits[s]}
    for r in records.values():
        assert len(r["text"]) == len(r["labels"]) >= 4
        assert r["labels"][0] == "NAME" and r["text"][0].split()[0] == r["id"]  # "zlib" or "shlex - A ..."
        assert [order[x] for x in r["labels"]] == sorted(order[x] for x in r["labels"])  # sections in page order
        assert not set(r["text"]) & set(dt._HEADINGS)  # heading lines are not blocks
    shlex = records["shlex"]
    assert (
        shlex["labels"][
            shlex["text"].index(
                "class shlex(builtins.object)\nshlex(instream=None, infile=None, posix=False, punctuation_chars=False)"
            )
        ]
        == "CLASSES"
    )
    split_block = next(i for i, b in enumerate(shlex["text"]) if b.startswith("split(s, comments=False"))
    assert shlex["labels"][split_block] == "FUNCTIONS"
    assert "PACKAGE CONTENTS" in records["json"]["labels"]
    assert dt.sequential_sentence_classification(docs, 42).splits == task.splits


def test_question_answering(docs):
    task = dt.question_answering(docs, 42)
    _assert_disjoint(task)
    records = [r for s in dt.SPLITS for r in task.splits[s]]
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert r["text"][r["answer_start"] :].startswith(r["answer"] + "(")
        assert r["text"][: r["answer_start"]].endswith(("\n\n", "\nFUNCTIONS\n"))  # where an entry starts
        assert " ".join(r["text"].split()).count(r["question"]) == 1
        assert len(r["question"].split()) >= 6
    by_id = {r["id"]: r for r in records}
    assert by_id["shlex#quote"]["question"] == "Return a shell-escaped version of the string *s*."
    assert by_id["shlex#quote"]["answer"] == "quote"
    # bisect_left and bisect_right open with the same sentence: an ambiguous question is left out
    assert "bisect#bisect_left" not in by_id and "bisect#bisect_right" not in by_id


def _check_mc_records(task, articles_text):
    """Every record: one MASK; the true choice, put back in the gap, gives back the article's text;
    the distractors have about its length, are not in the context, and come from the same split."""
    flat = " ".join(articles_text.split())
    sentences_of = {}
    for art in dt._wikitext_articles(articles_text):
        sentences_of[art.title] = {p.strip() for p in art.pieces}
    split_of = {d: s for s, ds in _docs_by_split(task).items() for d in ds}
    for split in dt.SPLITS:
        for r in task.splits[split]:
            assert r["text"].count(dt.MASK) == 1 and len(r["choices"]) == dt.NUM_CHOICES
            true = r["choices"][r["label"]]
            title = r["document"]
            assert true in sentences_of[title]
            filled = " ".join(r["text"].replace(dt.MASK, true).split())
            heading = "= {} = ".format(re.sub(r" \(\d+\)$", "", title))
            assert filled.startswith(heading) and filled[len(heading) :] in flat
            n = len(true.split())
            assert all(abs(len(c.split()) - n) <= max(1, round(0.1 * n)) for c in r["choices"])
            for j, c in enumerate(r["choices"]):
                if j != r["label"]:
                    assert c != true and c not in r["text"]
                    homes = [t for t, ss in sentences_of.items() if c in ss]
                    assert any(t == title or split_of.get(t) == split for t in homes)


def test_multiple_choice_on_a_synthetic_wikitext():
    text = _synthetic_wikitext()
    task = dt.multiple_choice(text, 7, per_article=5, context_words=60)
    _assert_disjoint(task)
    assert sum(len(v) for v in task.splits.values()) == 10 * 5
    _check_mc_records(task, text)
    for split in dt.SPLITS:
        for r in task.splits[split]:
            own = f"article {r['document'].split()[-1]} "
            assert own in r["choices"][r["label"]]  # cut from this very article
            assert sum(own in c for c in r["choices"]) <= 2  # at most one distractor from it
    assert dt.multiple_choice(text, 7, per_article=5, context_words=60).splits == task.splits
    assert len({r["label"] for s in dt.SPLITS for r in task.splits[s]}) > 1


@pytest.mark.skipif(not os.path.isfile(WIKITEXT_VALID), reason="needs ../shared/data/wikitext-2/valid.txt")
def test_multiple_choice_on_wikitext2():
    with open(WIKITEXT_VALID, encoding="utf-8") as f:
        text = f.read()
    task = dt.multiple_choice(text, 42, per_article=3)
    _assert_disjoint(task)
    assert len(_docs_by_split(task)["train"]) >= 40
    _check_mc_records(task, text)
    contexts = [len(r["text"].split()) for s in dt.SPLITS for r in task.splits[s]]
    assert min(contexts) > 500 and sorted(contexts)[len(contexts) // 2] >= 1000  # long documents


def test_build_tasks_writes_the_documented_files(tmp_path, docs):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(_synthetic_wikitext())
    out = tmp_path / "tasks"
    written = dt.build_tasks(str(out), None, 42, str(wiki), docs=docs, options=SMALL)
    assert sorted(written) == sorted(dt.TASK_NAMES)
    fields = {
        "document-classification": {"id", "document", "text", "label"},
        "sequential-sentence-classification": {"id", "document", "text", "labels"},
        "multiple-choice": {"id", "document", "text", "choices", "label"},
        "question-answering": {"id", "document", "text", "question", "answer", "answer_start"},
    }
    for name, path in written.items():
        meta = json.load(open(os.path.join(path, "task.json")))
        assert meta["task"] == name and meta["seed"] == 42
        readme = open(os.path.join(path, "README.md")).read()
        assert "**Split.**" in readme and "| train |" in readme
        labels = None
        if os.path.exists(os.path.join(path, "labels.txt")):
            labels = open(os.path.join(path, "labels.txt")).read().splitlines()
            assert labels == meta["labels"]
        docs_seen = []
        for split in dt.SPLITS:
            records = _read_split(path, split)
            assert len(records) == meta["splits"][split]["examples"] > 0
            docs_seen.append({r["document"] for r in records})
            for r in records:
                assert set(r) == fields[name]
                if name == "document-classification":
                    assert isinstance(r["text"], str) and r["label"] in labels
                elif name == "sequential-sentence-classification":
                    assert all(isinstance(b, str) for b in r["text"]) and set(r["labels"]) <= set(labels)
                elif name == "multiple-choice":
                    assert 0 <= r["label"] < len(r["choices"]) == dt.NUM_CHOICES
        assert not (docs_seen[0] & docs_seen[1] or docs_seen[0] & docs_seen[2] or docs_seen[1] & docs_seen[2])
    before = {p: open(p, "rb").read() for p in sorted(str(x) for x in out.rglob("*.jsonl"))}
    dt.build_tasks(str(out), None, 42, str(wiki), docs=docs, options=SMALL)  # rebuilding replaces, byte for byte
    assert {p: open(p, "rb").read() for p in sorted(str(x) for x in out.rglob("*.jsonl"))} == before
    assert sorted(os.listdir(out)) == sorted(dt.TASK_NAMES)  # no temporary folder left behind


def test_bad_input(tmp_path, docs, capsys):
    with pytest.raises(ValueError, match="unknown task"):
        dt.build_tasks(str(tmp_path / "o"), ["document-classification", "nope"], docs=docs)
    with pytest.raises(SystemExit):
        dt.main(["--output", str(tmp_path / "o"), "--task", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    missing = str(tmp_path / "absent" / "valid.txt")
    with pytest.raises(FileNotFoundError, match="--wikitext"):
        dt.build_tasks(str(tmp_path / "o"), ["multiple-choice"], wikitext=missing)
    assert dt.main(["--output", str(tmp_path / "o"), "--task", "multiple-choice", "--wikitext", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: multiple-choice needs WikiText-2") and err.count("\n") == 1
    # all tasks: the WikiText one is skipped with a message, the others are written
    written = dt.build_tasks(str(tmp_path / "all"), None, wikitext=missing, docs=docs, options=SMALL)
    assert "multiple-choice" not in written and "document-classification" in written
    assert "skipping multiple-choice" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        dt.build_tasks(str(a_file), ["question-answering"], docs=docs)
    foreign = tmp_path / "foreign" / "question-answering"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not written by"):
        dt.build_tasks(str(tmp_path / "foreign"), ["question-answering"], docs=docs)
    assert (foreign / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="at least 3"):
        dt.multiple_choice(" = A = \n \n Only one article here with some words in it .\n", 1)
    with pytest.raises(ValueError, match="too few per split"):
        dt.multiple_choice(_synthetic_wikitext(n_articles=5), 1)
