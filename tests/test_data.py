"""Tests of the MLM input pipeline (train.data), the document layouts (train.layout) and the record
format (train.records): readers, tokenizer, layouts, masking, grain iterators over prepared shards."""

import gzip
import json
import os
import re

import numpy as np
import pytest

from longformer_jax.losses import IGNORE_INDEX
from train import corpus, data, layout, prepare_data, records
from train.masking import MaskingSpec, mask_tokens, max_masked
from train.objectives import count_mlm_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT_VALID = os.path.join(REPO, "..", "shared", "data", "wikitext-2", "valid.txt")
SMALL_MODULES = ("argparse", "collections", "json", "logging", "textwrap")


@pytest.fixture(scope="session")
def small_docs():
    """A small slice of the built-in corpus: the pydoc pages of a few modules."""
    return [text for _, text in corpus.python_docs_corpus(SMALL_MODULES)]


@pytest.fixture(scope="session")
def tok(small_docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    return data.train_demo_tokenizer(small_docs, str(out), vocab_size=600, model_max_length=1024)


def prepare(docs, tok, out, **settings):
    """Prepared data of ``docs`` (written as JSON lines, one file per list in ``docs``) in ``out``."""
    src = out.parent / f"{out.name}-src"
    src.mkdir(parents=True)
    for n, part in enumerate(docs):
        (src / f"part{n}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    settings = {"min_doc_tokens": 0, **settings}
    return prepare_data.prepare(str(src), tok, out, prepare_data.Settings(**settings), progress=False)


def decoded(prepared, which="train"):
    """Every example of the prepared training shards (or the held-out file), decoded, in order."""
    from array_record.python.array_record_module import ArrayRecordReader

    files = prepared.train_files() if which == "train" else [prepared.eval_file()]
    rows = []
    for path, _ in files:
        reader = ArrayRecordReader(str(path))
        rows += [prepared.record_layout.decode(r) for r in reader.read_all()]
        reader.close()
    return {k: np.stack([r[k] for r in rows]) for k in data.MODEL_KEYS}


def _unmask(batch):
    return np.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


def _rows(batches):
    return [tuple(r) for b in batches for r in _unmask(b)]


# ------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------


def test_builtin_corpus_is_deterministic_and_clean():
    rendered = corpus.python_docs_corpus.__wrapped__(("json", "textwrap", "no_such_module"))
    again = corpus.python_docs_corpus.__wrapped__(("json", "textwrap"))
    assert rendered == again
    assert [name for name, _ in rendered] == ["json", "textwrap"]
    for _, text in rendered:
        assert text.startswith("NAME")
        assert not re.search(r"0x[0-9a-f]{8}", text) and "\nFILE\n" not in text and "|  " not in text


@pytest.mark.slow
def test_builtin_corpus_full_is_several_megabytes():
    docs = list(data.read_documents("builtin:python-docs"))
    assert len(docs) > 200
    assert sum(map(len, docs)) > 2_000_000
    assert any(d.startswith('The "if" statement') for d in docs)  # language-reference topics


def test_read_txt_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n\nStill second.\n")
    (tmp_path / "a.txt").write_text("First file. One document.\n\nAnother paragraph.\n")
    (tmp_path / "sub").mkdir()
    with gzip.open(tmp_path / "sub" / "c.txt.gz", "wt") as f:
        f.write("Third, compressed.")
    (tmp_path / "notes.md").write_text("ignored")
    docs = list(data.read_documents(str(tmp_path)))
    assert docs == [
        "First file. One document.\n\nAnother paragraph.",
        "Second file.\n\nStill second.",
        "Third, compressed.",
    ]
    assert list(data.read_documents(str(tmp_path / "a.txt"), txt_mode="paragraphs")) == [
        "First file. One document.",
        "Another paragraph.",
    ]


def test_read_wikitext_style_txt(tmp_path):
    text = (
        " \n = Alpha = \n \n Alpha text . \n \n = = Section = = \n \n More alpha . \n \n = Beta = \n \n Beta text . \n"
    )
    (tmp_path / "w.txt").write_text(text)
    docs = list(data.read_documents(str(tmp_path / "w.txt")))
    assert len(docs) == 2
    assert docs[0].startswith("= Alpha =") and "= = Section = =" in docs[0] and "More alpha" in docs[0]
    assert docs[1].startswith("= Beta =") and "Alpha" not in docs[1]


def test_read_jsonl_and_parquet(tmp_path):
    rows = [{"text": "doc one", "id": 1}, {"text": "doc two"}, {"text": "  "}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(data.read_documents(str(path))) == ["doc one", "doc two"]

    bad = tmp_path / "bad" / "x.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: no field 'text'.*text_field"):
        list(data.read_documents(str(bad)))
    assert list(data.read_documents(str(bad), text_field="content")) == ["x"]

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ppath = tmp_path / "p" / "d.parquet"
    ppath.parent.mkdir()
    pq.write_table(pa.table({"text": ["alpha", "beta", None], "n": [1, 2, 3]}), str(ppath))
    assert list(data.read_documents(str(ppath.parent))) == ["alpha", "beta"]


def test_glob_pattern_selects_c4_train_files(tmp_path):
    for name in ("c4-train.00000-of-00002", "c4-train.00001-of-00002", "c4-validation.00000-of-00001"):
        with gzip.open(tmp_path / f"{name}.json.gz", "wt") as f:
            f.write(json.dumps({"text": f"doc of {name}", "url": "u"}) + "\n")
    units = corpus.source_units(str(tmp_path / "c4-train.*.json.gz"))
    assert [u.name for u in units] == ["c4-train.00000-of-00002.json.gz", "c4-train.00001-of-00002.json.gz"]
    assert [d for u in units for d in u.read()] == ["doc of c4-train.00000-of-00002", "doc of c4-train.00001-of-00002"]
    assert len(corpus.source_units(str(tmp_path))) == 3  # the folder: validation files too
    with pytest.raises(ValueError, match=r"matches no .* file; check the pattern"):
        corpus.source_units(str(tmp_path / "c4-test.*.json.gz"))


def test_read_wikitext2_validation_articles():
    if not os.path.exists(WIKITEXT_VALID):
        pytest.skip(f"WikiText-2 not present at {WIKITEXT_VALID} (shared data folder absent)")
    docs = list(data.read_documents(WIKITEXT_VALID))
    assert len(docs) == 60
    assert all(d.startswith("= ") and not d.startswith("= =") for d in docs)
    assert np.median([len(d.split()) for d in docs]) > 2000


def test_hf_spec_parsing():
    assert corpus.parse_hf_spec("hf:allenai/c4:en") == ("allenai/c4", "en", "train")
    assert corpus.parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:validation") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    assert corpus.parse_hf_spec("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    for bad in ("hf:", "hf:a::b", "hf:a:b:c:d"):
        with pytest.raises(ValueError, match="hf:NAME"):
            data.read_documents(bad)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: str(p / "missing"), r"'.*missing' does not exist; pass a \.txt/\.jsonl/\.parquet"),
        (lambda p: (p / "empty.txt").write_text("") and None or str(p / "empty.txt"), r"is empty.*--data"),
        (lambda p: (p / "d").mkdir() or str(p / "d"), r"holds no .*files; point --data"),
        (lambda p: (p / "x.csv").write_text("a") and None or str(p / "x.csv"), r"unsupported type"),
        (lambda p: "builtin:nope", r"unknown built-in corpus 'builtin:nope'.*builtin:python-docs"),
    ],
    ids=["missing", "empty-file", "empty-dir", "unsupported", "unknown-builtin"],
)
def test_read_documents_bad_paths(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        data.read_documents(make(tmp_path))


def test_whitespace_only_corpus_raises(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        list(data.read_documents(str(tmp_path / "blank.txt")))


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


def test_demo_tokenizer_is_roberta_like(tok):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tok.name_or_path)
    for t in (tok, reloaded):
        specials = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
        assert [t.convert_tokens_to_ids(s) for s in specials] == [0, 1, 2, 3, 4]
        assert (t.bos_token_id, t.pad_token_id, t.eos_token_id, t.mask_token_id) == (0, 1, 2, 4)
        assert t.model_max_length == 1024
        assert len(t) == 600
    enc = reloaded("The value is <mask> here.")["input_ids"]
    assert enc[0] == 0 and enc[-1] == 2 and enc.count(4) == 1
    assert reloaded.convert_ids_to_tokens(enc[enc.index(4) - 1]) == "Ġis"  # <mask> eats the space
    assert reloaded.decode(reloaded("Return a new dict.")["input_ids"], skip_special_tokens=True) == (
        "Return a new dict."
    )
    assert data.load_tokenizer(tok.name_or_path, model_max_length=4096).model_max_length == 4096


def test_tokenizer_without_mask_or_pad_is_rejected(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    bare.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match=r"tokenizer '.*bare' has no mask token.*pad token.*roberta-base"):
        data.load_tokenizer(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match=r"has no mask token .*add_special_tokens"):
        data.token_ids(bare)
    with pytest.raises(ValueError, match=r"could not load tokenizer '.*nowhere'"):
        data.load_tokenizer(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------
# Layouts and records
# ------------------------------------------------------------------------------------------


def test_group_blocks_is_greedy_and_cuts_long_sentences():
    sentences = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14], [15]]
    assert layout.group_blocks(sentences, 6) == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15]]
    assert layout.group_blocks([], 6) == []


def test_blocks_example_and_document_examples():
    sizes = dict(seq_len=12, block_size=4, bos_id=0, eos_id=2, pad_id=1)
    ex = layout.blocks_example([[7, 8, 9], [10]], **sizes)
    np.testing.assert_array_equal(ex["input_ids"], [0, 7, 8, 9, 2, 10, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(ex["attention_mask"], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(ex["global_attention_mask"], [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    assert all(v.dtype == np.int32 and v.shape == (12,) for v in ex.values())
    # 7 blocks of 3 tokens: examples of 3, 3 and 1 blocks; min_blocks=2 drops the last.
    sentences = [[10 + i] * 3 for i in range(7)]
    assert len(layout.document_blocks_examples(sentences, **sizes)) == 3
    kept = layout.document_blocks_examples(sentences, min_blocks=2, **sizes)
    assert len(kept) == 2 and kept[1]["input_ids"][0] == 0 and kept[1]["input_ids"][1] == 13


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_records_rebuild_the_examples_exactly(dtype):
    rng = np.random.default_rng(0)
    sizes = dict(seq_len=64, block_size=16, bos_id=0, eos_id=2, pad_id=1)
    rl = records.RecordLayout(layout="blocks", dtype=dtype, **sizes)
    for _ in range(20):
        blocks = [rng.integers(5, 60_000, size=rng.integers(1, 16)).tolist() for _ in range(rng.integers(1, 5))]
        record = rl.encode_blocks(blocks)
        assert len(record) == (1 + len(blocks) + sum(map(len, blocks))) * np.dtype(dtype).itemsize
        got, want = rl.decode(record), layout.blocks_example(blocks, **sizes)
        for k in data.MODEL_KEYS:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == np.int32
        assert rl.content_tokens(record) == sum(map(len, blocks))
    cl = records.RecordLayout(layout="contiguous", dtype=dtype, **sizes)
    tokens = rng.integers(5, 60_000, size=63).tolist()
    ex = cl.decode(cl.encode_contiguous(tokens))
    np.testing.assert_array_equal(ex["input_ids"], [0, *tokens])
    assert ex["attention_mask"].all() and not ex["global_attention_mask"].any()
    assert records.token_dtype(50_265, 4096, 128) == "uint16" and records.token_dtype(70_000, 4096, 128) == "uint32"


def test_contiguous_examples_cut_the_stream_across_documents():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # stream 5 6 7 </s> 8 9 </s> 10 11 12 13 </s>
    got = list(layout.contiguous_examples(docs, seq_len=5, bos_id=0, eos_id=2))
    np.testing.assert_array_equal(
        [ex["input_ids"] for ex in got], [[0, 5, 6, 7, 2], [0, 8, 9, 2, 10], [0, 11, 12, 13, 2]]
    )
    assert all(ex["attention_mask"].all() and not ex["global_attention_mask"].any() for ex in got)


def test_check_layout_names_the_fix():
    layout.check_layout("blocks", 64, 16, 4)
    with pytest.raises(ValueError, match=r"seq_len=100 is not a multiple of block_size=16; use seq_len=96"):
        layout.check_layout("blocks", 100, 16)
    with pytest.raises(ValueError, match=r"min_blocks=5 must lie in \[1, 4\]"):
        layout.check_layout("blocks", 64, 16, 5)
    with pytest.raises(ValueError, match="layout='rows' is not one of"):
        layout.check_layout("rows", 64, 16)


def test_blocks_layout_invariants(tok, small_docs, tmp_path):
    seq_len, block = 256, 32
    prepared = prepare([small_docs], tok, tmp_path / "p", seq_len=seq_len, block_size=block, min_doc_tokens=200)
    ex = decoded(prepared)
    ids, am, gm = ex["input_ids"], ex["attention_mask"], ex["global_attention_mask"]
    n = len(ids)
    assert n > 10 and n == prepared.num_train
    for k in data.MODEL_KEYS:
        assert ex[k].shape == (n, seq_len) and ex[k].dtype == np.int32
    ids_b, am_b, gm_b = (x.reshape(n, seq_len // block, block) for x in (ids, am, gm))
    used = am_b[:, :, 0] == 1  # blocks holding text
    assert np.all(used[:, 0])
    assert np.all(ids_b[:, 0, 0] == 0)  # <s> opens every example
    assert np.all(ids_b[:, 1:, 0][used[:, 1:]] == 2)  # </s> opens every later block
    assert np.all(gm_b[:, :, 0] == used) and gm.sum() == used.sum()  # global exactly on starts
    assert np.all(np.isin(ids_b[:, :, 1:], [0, 2], invert=True))  # no start token inside a block
    # A block's text is a prefix of it, then padding (attention 0) to the block's end.
    assert np.all(np.diff(am_b, axis=-1) <= 0)
    assert np.all((ids == 1) == (am == 0))
    # Blocks fill up greedily: more than half the positions hold text.
    assert am.mean() > 0.5
    # Unused blocks only at the end of an example.
    assert np.all(np.diff(used.astype(int), axis=1) <= 0)
    assert prepared.content["totals"]["train_tokens"] == int(am.sum() - used.sum())


def test_blocks_layout_keeps_every_token_in_order(tok):
    doc = "Alpha beta gamma. " * 30 + "A very long sentence " + "with many words " * 40 + "ends here."
    settings = prepare_data.Settings(seq_len=128, block_size=16, min_doc_tokens=1)
    rl = records.RecordLayout("blocks", 128, 16, 0, 2, 1, "uint16")
    [(n_tokens, recs)] = prepare_data.DocumentEncoder(tok, settings, rl)([doc])
    ex = [rl.decode(r) for r in recs]
    content = [
        t for e in ex for t, keep in zip(e["input_ids"], e["attention_mask"], strict=True) if keep and t not in (0, 2)
    ]
    want = tok(doc, add_special_tokens=False)["input_ids"]
    assert content == want and n_tokens == len(want)  # sentence split + grouping + cutting lose nothing
    assert len(ex) >= 2  # the long document made several examples
    # The sentences are NLTK Punkt's (train.sentences), not a regex: "Mr. Smith" stays in one block.
    [(_, recs)] = prepare_data.DocumentEncoder(tok, settings, rl)(["He met Mr. Smith there. It rained."])
    lengths = np.frombuffer(recs[0], np.uint16)
    assert lengths[0] == 2 and lengths[1] == len(tok("He met Mr. Smith there.", add_special_tokens=False).input_ids)


def test_min_doc_tokens_and_min_blocks(tok):
    doc = " ".join(f"Sentence number {i} is here." for i in range(60))
    rl = records.RecordLayout("blocks", 64, 16, 0, 2, 1, "uint16")
    n_doc = len(tok(doc, add_special_tokens=False).input_ids)

    def encode(docs, **kw):
        return prepare_data.DocumentEncoder(tok, prepare_data.Settings(seq_len=64, block_size=16, **kw), rl)(docs)

    (n, full), (n_short, dropped) = encode([doc, "Too short to keep."], min_doc_tokens=n_doc)
    assert n == n_doc and full and dropped is None and n_short < n_doc
    assert encode([doc], min_doc_tokens=n_doc + 1)[0][1] is None
    strict = encode([doc], min_doc_tokens=0, min_blocks=4)[0][1]
    n_blocks_last = np.frombuffer(full[-1], np.uint16)[0]
    assert len(strict) == len(full) - (n_blocks_last < 4)


def test_contiguous_layout(tok, small_docs, tmp_path):
    seq_len = 128
    prepared = prepare([small_docs], tok, tmp_path / "p", layout="contiguous", seq_len=seq_len)
    ids = decoded(prepared)["input_ids"]
    assert ids.shape[1] == seq_len and ids.dtype == np.int32
    assert np.all(ids[:, 0] == 0) and not np.any(ids[:, 1:] == 0)
    assert not np.any(ids == 1)
    stream = []
    for d in small_docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [2]
    assert len(ids) == len(stream) // (seq_len - 1)
    np.testing.assert_array_equal(ids[:, 1:].reshape(-1), stream[: len(ids) * (seq_len - 1)])


# ------------------------------------------------------------------------------------------
# Masking
# ------------------------------------------------------------------------------------------


def test_masking_statistics():
    rng = np.random.default_rng(0)
    n, length = 64, 512
    ids = rng.integers(5, 1000, size=(n, length)).astype(np.int32)
    ids[:, ::16] = 2  # specials
    am = np.ones_like(ids)
    am[:, -100:] = 0
    ids[:, -100:] = 1
    spec = MaskingSpec(mask_id=4, special_ids=np.array([0, 1, 2, 3, 4]), random_ids=np.arange(5, 1000))
    out = mask_tokens({"input_ids": ids, "attention_mask": am}, np.random.default_rng(1), spec)
    assert out["input_ids"].dtype == np.int32 and out["labels"].dtype == np.int32
    np.testing.assert_array_equal(ids, np.where(out["labels"] >= 0, out["labels"], ids))  # untouched input
    chosen = out["labels"] != IGNORE_INDEX
    maskable = (am == 1) & (ids != 2)
    assert not np.any(chosen & ~maskable)  # never special tokens, never padding
    np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])
    np.testing.assert_array_equal(out["labels"][chosen], ids[chosen])
    rate = chosen.sum() / maskable.sum()
    assert abs(rate - 0.15) < 0.01
    new = out["input_ids"][chosen]
    masked = np.mean(new == 4)
    kept = np.mean(new == ids[chosen])
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02
    assert np.all(new[new != 4] >= 5)  # random replacements come from the non-special vocabulary


def test_masking_spec_from_tokenizer(tok):
    spec = data.masking_spec(tok, 0.2)
    assert spec.mask_id == 4 and spec.mlm_probability == 0.2
    assert set(spec.special_ids) >= {0, 1, 2, 3, 4}
    assert not np.isin(spec.random_ids, spec.special_ids).any() and len(spec.random_ids) == len(tok) - 5
    with pytest.raises(ValueError, match=r"mlm_probability=1.5 must lie in \(0, 1\)"):
        data.masking_spec(tok, 1.5)


# ------------------------------------------------------------------------------------------
# Iterators over prepared shards
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows_prepared(tok, small_docs, tmp_path_factory):
    """Contiguous examples of 32 tokens in two shards, one held-out document."""
    out = tmp_path_factory.mktemp("rows") / "p"
    return prepare([small_docs[:2], small_docs[2:]], tok, out, layout="contiguous", seq_len=32, eval_docs=1)


def _iterator(prepared, tok, batch, seed, **kw):
    return data.make_train_iterator(prepared, data.masking_spec(tok), data.Batching(batch, seed=seed, **kw))


def test_train_iterator_batches_and_determinism(tok, rows_prepared):
    n = rows_prepared.num_train
    assert n > 40 and len(rows_prepared.train_files()) == 2
    it = _iterator(rows_prepared, tok, 8, seed=7)
    batches = [next(it) for _ in range(2 * n // 8 + 1)]  # two epochs and a bit
    b = batches[0]
    slots, K = {"masked_positions", "masked_labels"}, max_masked(32, 0.15)  # train.masking's slots: (8, K)
    assert set(b) == {"input_ids", "attention_mask", "global_attention_mask", "labels"} | slots
    assert all(v.shape == ((8, K) if k in slots else (8, 32)) and v.dtype == np.int32 for k, v in b.items())
    same = data.make_train_iterator(rows_prepared, data.masking_spec(tok), data.Batching(8, seed=7), num_threads=0)
    for x, y in zip(batches, (next(same) for _ in range(len(batches))), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = next(_iterator(rows_prepared, tok, 8, seed=8))
    assert not np.array_equal(other["input_ids"], b["input_ids"])
    # Each epoch is a permutation of the examples of both shards, shuffled anew.
    rows = _rows(batches)
    everything = sorted(tuple(r) for r in decoded(rows_prepared)["input_ids"])
    assert sorted(rows[:n]) == everything and sorted(rows[n : 2 * n]) == everything
    assert rows[:n] != rows[n : 2 * n]
    assert any(np.any(x["labels"] != IGNORE_INDEX) for x in batches)


def test_masking_is_fresh_each_epoch(tok, rows_prepared):
    n = rows_prepared.num_train
    it = _iterator(rows_prepared, tok, n, seed=0)
    first, second = next(it), next(it)
    order = {tuple(r): i for i, r in enumerate(_unmask(first))}
    perm = [order[tuple(r)] for r in _unmask(second)]
    assert not np.array_equal(first["labels"][perm], second["labels"])


def test_train_iterator_resume(tok, rows_prepared):
    uninterrupted = _iterator(rows_prepared, tok, 3, seed=5)
    want = [next(uninterrupted) for _ in range(15)]
    it = _iterator(rows_prepared, tok, 3, seed=5)
    for _ in range(8):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"examples_seen": 24}
    resumed = _iterator(rows_prepared, tok, 3, seed=5)
    resumed.set_state(state)
    for x, y in zip(want[8:], (next(resumed) for _ in range(7)), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for bad in ({"examples_seen": 25}, {"next_index": 3}, {"examples_seen": -3}):
        with pytest.raises(ValueError, match="whole global batches of 3"):
            resumed.set_state(bad)


def test_hosts_read_disjoint_rows_of_each_global_batch(tok, rows_prepared):
    hosts = [_iterator(rows_prepared, tok, 2, seed=3, shard_index=h, shard_count=2) for h in range(2)]
    per_host = [[next(h) for _ in range(5)] for h in hosts]
    single = _iterator(rows_prepared, tok, 4, seed=3)
    for t in range(5):  # global batch t: host 0's rows, then host 1's
        g = next(single)
        for k in g:
            np.testing.assert_array_equal(g[k], np.concatenate([per_host[0][t][k], per_host[1][t][k]]))
    assert not set(_rows(per_host[0])) & set(_rows(per_host[1]))
    # A position saved by one host of batch 4 continues on two hosts of batch 2 at the same example.
    state = single.get_state()
    assert state == {"examples_seen": 20}
    moved = [_iterator(rows_prepared, tok, 2, seed=3, shard_index=h, shard_count=2) for h in range(2)]
    for m in moved:
        m.set_state(state)
    for _ in range(3):
        g, parts = next(single), [next(m) for m in moved]
        for k in g:
            np.testing.assert_array_equal(g[k], np.concatenate([p[k] for p in parts]))
    with pytest.raises(ValueError, match=r"shard_index=2 must lie in \[0, shard_count=2\)"):
        data.Batching(2, seed=3, shard_index=2, shard_count=2)


def test_train_iterator_position_is_checkpointed(tok, rows_prepared, tmp_path):
    """The trainer's Checkpointer stores the iterator's position as it was when the save started."""
    from train.checkpoint import Checkpointer

    it = _iterator(rows_prepared, tok, 2, seed=1)
    for _ in range(3):
        next(it)
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    state = {"w": np.arange(3.0)}
    ck.save(3, state, it.get_state(), {"step": 3})
    want = [next(it) for _ in range(4)]  # the iterator moves on while the save completes
    ck.close()
    fresh = _iterator(rows_prepared, tok, 2, seed=1)
    restorer = Checkpointer(tmp_path / "ckpt", read_only=True)
    restored, data_state, meta = restorer.restore(restorer.latest_step(), state)
    restorer.close()
    assert data_state == {"examples_seen": 6}
    fresh.set_state(data_state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta == {"step": 3}
    for x, y in zip(want, (next(fresh) for _ in range(4)), strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["labels"], y["labels"])


def _check_slots(batch, K):
    """train.masking's slots of a batch: every labelled position in a slot, in order, with its label."""
    labels, positions, slot_labels = batch["labels"], batch["masked_positions"], batch["masked_labels"]
    assert positions.shape == slot_labels.shape == (len(labels), K)
    for y, p, s in zip(labels, positions, slot_labels, strict=True):
        used = p >= 0
        np.testing.assert_array_equal(p[used], np.flatnonzero(y != IGNORE_INDEX))  # none dropped, increasing
        np.testing.assert_array_equal(s[used], y[p[used]])
        assert np.all(s[~used] == IGNORE_INDEX) and np.all(used[: used.sum()])  # unused slots last


def test_train_and_eval_batches_carry_the_masked_slots(tok, rows_prepared):
    K = max_masked(32, 0.15)
    batch = next(_iterator(rows_prepared, tok, 4, seed=0))
    _check_slots(batch, K)
    n = rows_prepared.num_eval
    g = next(g for g in (64, 48, 40, 24) if n % g)  # a batch size that leaves filler rows
    evals = data.make_eval_batches(rows_prepared, data.masking_spec(tok), data.Batching(g, seed=0))
    assert len(evals) == -(-n // g)
    last, real_rows = evals[-1], n % g
    for b in [*evals[:-1], {k: v[:real_rows] for k, v in last.items()}]:
        _check_slots(b, K)
    # Filler rows (copies of real ones, filling the last batch) count no label.
    assert np.all(last["masked_labels"][real_rows:] == IGNORE_INDEX)
    assert np.all(last["labels"][real_rows:] == IGNORE_INDEX)
    assert np.any(last["masked_positions"][real_rows:] >= 0)  # the copies keep their positions; their labels say no
    real = int(np.sum(last["labels"][:real_rows] != IGNORE_INDEX))
    assert real > 0 and float(count_mlm_labels(last)) == real


def test_eval_batches(tok, rows_prepared):
    spec, n = data.masking_spec(tok), rows_prepared.num_eval
    assert n >= 5
    batches = data.make_eval_batches(rows_prepared, spec, data.Batching(4, seed=0))
    again = data.make_eval_batches(rows_prepared, spec, data.Batching(4, seed=0))
    assert len(batches) == -(-n // 4) and all(b["labels"].shape == (4, 32) for b in batches)
    for x, y in zip(batches, again, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    if n % 4:
        assert np.all(batches[-1]["labels"][n % 4 :] == IGNORE_INDEX)  # filler rows add no loss
    assert _rows(batches)[:n] == [tuple(r) for r in decoded(rows_prepared, "eval")["input_ids"]]
    assert len(data.make_eval_batches(rows_prepared, spec, data.Batching(4, seed=0), max_batches=1)) == 1
    unpadded = data.make_eval_batches(rows_prepared, spec, data.Batching(4, seed=0), pad_last=False)
    assert len(unpadded[-1]["labels"]) == (n % 4 or 4)
    halves = [
        data.make_eval_batches(rows_prepared, spec, data.Batching(2, seed=0, shard_index=h, shard_count=2))
        for h in range(2)
    ]
    for t, b in enumerate(batches):
        both = np.concatenate([halves[0][t]["labels"], halves[1][t]["labels"]])
        np.testing.assert_array_equal(b["labels"], both)
