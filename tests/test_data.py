"""Tests of the MLM input pipeline (train.data) and the document layouts (train.layout): readers,
tokenizer, layouts, masking, grain iterators."""

import gzip
import json
import os
import re

import numpy as np
import pytest

from longformer_jax.losses import IGNORE_INDEX
from train import corpus, data, layout
from train.masking import MaskingSpec, mask_tokens, max_masked

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


def _synthetic_examples(n, length=32, first=10):
    """n distinct rows: row i is <s> then tokens first+i, first+i+1, ... (no padding)."""
    ids = (first + np.arange(n)[:, None] + np.arange(length)[None, :]) % 500 + 10
    ids[:, 0] = 0
    return {
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones((n, length), np.int32),
        "global_attention_mask": np.zeros((n, length), np.int32),
        "doc_index": np.arange(n, dtype=np.int32),
    }


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
        " \n = Alpha = \n \n Alpha text . \n \n = = Section = = \n \n More alpha . \n"
        " \n = Beta = \n \n Beta text . \n"
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
        "wikitext", "wikitext-2-raw-v1", "validation")
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
        "Return a new dict.")
    assert data.load_tokenizer(tok.name_or_path, model_max_length=4096).model_max_length == 4096


def test_tokenizer_without_mask_or_pad_is_rejected(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    bare.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match=r"tokenizer '.*bare' has no mask token.*pad token.*roberta-base"):
        data.load_tokenizer(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match=r"has no mask token .*add_special_tokens"):
        data.build_examples(["word " * 50], bare, layout="contiguous", seq_len=16)
    with pytest.raises(ValueError, match=r"could not load tokenizer '.*nowhere'"):
        data.load_tokenizer(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------


def test_split_sentences():
    text = 'One sentence. Two "quoted!" Three? \n\nNew paragraph without end\nnext line'
    assert layout.split_sentences(text) == [
        "One sentence.", ' Two "quoted!"', " Three?", " \n\nNew paragraph without end\nnext line"]
    assert "".join(layout.split_sentences(text)) == text
    assert layout.split_sentences("  \n ") == []


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


def test_contiguous_examples_cut_the_stream_across_documents():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # stream 5 6 7 </s> 8 9 </s> 10 11 12 13 </s>
    got = list(layout.contiguous_examples(docs, seq_len=5, bos_id=0, eos_id=2))
    assert [i for i, _ in got] == [0, 1, 2]
    np.testing.assert_array_equal([ex["input_ids"] for _, ex in got],
                                  [[0, 5, 6, 7, 2], [0, 8, 9, 2, 10], [0, 11, 12, 13, 2]])
    assert all(ex["attention_mask"].all() and not ex["global_attention_mask"].any() for _, ex in got)


def test_check_layout_names_the_fix():
    layout.check_layout("blocks", 64, 16, 4)
    with pytest.raises(ValueError, match=r"seq_len=100 is not a multiple of block_size=16; use seq_len=96"):
        layout.check_layout("blocks", 100, 16)
    with pytest.raises(ValueError, match=r"min_blocks=5 must lie in \[1, 4\]"):
        layout.check_layout("blocks", 64, 16, 5)
    with pytest.raises(ValueError, match="layout='rows' is not one of"):
        layout.check_layout("rows", 64, 16)


def test_blocks_layout_invariants(tok, small_docs):
    seq_len, block = 256, 32
    ex = data.build_examples(small_docs, tok, layout="blocks", seq_len=seq_len, block_size=block,
                             min_doc_words=100)
    ids, am, gm = ex["input_ids"], ex["attention_mask"], ex["global_attention_mask"]
    n = len(ids)
    assert n > 10
    for k in data.MODEL_KEYS:
        assert ex[k].shape == (n, seq_len) and ex[k].dtype == np.int32
    assert ex["doc_index"].shape == (n,) and np.all(np.diff(ex["doc_index"]) >= 0)
    assert set(np.unique(ex["doc_index"])) == set(range(len(small_docs)))
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


def test_blocks_layout_keeps_every_token_in_order(tok):
    doc = "Alpha beta gamma. " * 30 + "A very long sentence " + "with many words " * 40 + "ends here."
    ex = data.build_examples([doc], tok, layout="blocks", seq_len=128, block_size=16, min_doc_words=1)
    content = [t for row, m in zip(ex["input_ids"], ex["attention_mask"], strict=True)
               for t, keep in zip(row, m, strict=True) if keep and t not in (0, 2)]
    want = tok(doc, add_special_tokens=False)["input_ids"]
    assert content == want  # sentence split + greedy grouping + cutting lose and reorder nothing
    assert len(ex["input_ids"]) >= 2  # the long document made several examples


def test_blocks_min_blocks_and_min_doc_words(tok):
    doc = " ".join(f"Sentence number {i} is here." for i in range(60))
    full = data.build_examples([doc], tok, seq_len=64, block_size=16, min_doc_words=10)
    strict = data.build_examples([doc], tok, seq_len=64, block_size=16, min_doc_words=10, min_blocks=4)
    n_blocks_last = full["attention_mask"][-1].reshape(4, 16)[:, 0].sum()
    assert len(strict["input_ids"]) == len(full["input_ids"]) - (n_blocks_last < 4)
    short = "Too short to keep."
    got = data.build_examples([short, doc], tok, seq_len=64, block_size=16, min_doc_words=10)
    np.testing.assert_array_equal(got["input_ids"], full["input_ids"])
    with pytest.raises(ValueError, match=r"no document long enough.*min_doc_words=1024.*--min-doc-words"):
        data.build_examples([short, doc], tok, seq_len=64, block_size=16)
    with pytest.raises(ValueError, match=r"no documents given"):
        data.build_examples([], tok, seq_len=64, block_size=16)
    with pytest.raises(ValueError, match=r"seq_len=100 is not a multiple of block_size=16; use seq_len=96"):
        data.build_examples([doc], tok, seq_len=100, block_size=16, min_doc_words=0)


def test_contiguous_layout(tok, small_docs):
    seq_len = 128
    ex = data.build_examples(small_docs, tok, layout="contiguous", seq_len=seq_len)
    ids = ex["input_ids"]
    assert ids.shape[1] == seq_len and ids.dtype == np.int32
    assert np.all(ids[:, 0] == 0) and not np.any(ids[:, 1:] == 0)
    assert not np.any(ids == 1)
    assert np.all(ex["attention_mask"] == 1) and np.all(ex["global_attention_mask"] == 0)
    stream = []
    for d in small_docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [2]
    assert len(ids) == len(stream) // (seq_len - 1)
    np.testing.assert_array_equal(ids[:, 1:].reshape(-1), stream[: len(ids) * (seq_len - 1)])
    assert ex["doc_index"][0] == 0 and ex["doc_index"][-1] <= len(small_docs) - 1
    with pytest.raises(ValueError, match=r"fewer tokens than one example.*--seq-len"):
        data.build_examples(["a few words only"], tok, layout="contiguous", seq_len=seq_len)


def test_max_docs(tok, small_docs):
    ex = data.build_examples(iter(small_docs), tok, seq_len=64, block_size=32, min_doc_words=0, max_docs=2)
    assert set(np.unique(ex["doc_index"])) == {0, 1}


def test_split_examples_by_document():
    ex = _synthetic_examples(40)
    ex["doc_index"] = np.repeat(np.arange(10), 4).astype(np.int32)
    train, evaluation = data.split_examples(ex, 0.2, seed=0)
    assert len(evaluation["input_ids"]) == 8 and len(train["input_ids"]) == 32
    assert not set(train["doc_index"]) & set(evaluation["doc_index"])
    again = data.split_examples(ex, 0.2, seed=0)[1]
    np.testing.assert_array_equal(again["input_ids"], evaluation["input_ids"])
    assert len(data.split_examples(ex, 3, seed=1)[1]["input_ids"]) == 4  # no document fits: the smallest
    counted = data.split_examples(ex, 5, seed=1)[1]
    assert len(counted["input_ids"]) == 4  # whole documents, never above the target
    one_doc = dict(ex, doc_index=np.zeros(40, np.int32))
    assert len(data.split_examples(one_doc, 5, seed=1)[1]["input_ids"]) == 5
    assert len(data.split_examples(ex, 0.0, seed=1)[1]["input_ids"]) == 0
    assert len(data.split_examples(ex, seed=0, eval_fraction=0.2)[1]["input_ids"]) == 8
    assert len(data.split_examples(one_doc, seed=0, eval_examples=7)[1]["input_ids"]) == 7
    with pytest.raises(ValueError, match="at least one must stay for training"):
        data.split_examples(ex, 40, seed=0)


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
# Iterators
# ------------------------------------------------------------------------------------------


def test_train_iterator_batches_and_determinism(tok):
    ex = _synthetic_examples(24)
    it = data.make_train_iterator(ex, tok, data.Batching(4, seed=7))
    batches = [next(it) for _ in range(12)]  # two epochs
    b = batches[0]
    slots, K = {"masked_positions", "masked_labels"}, max_masked(32, 0.15)  # train.masking's slots: (4, K)
    assert set(b) == {"input_ids", "attention_mask", "global_attention_mask", "labels"} | slots
    assert all(v.shape == ((4, K) if k in slots else (4, 32)) and v.dtype == np.int32 for k, v in b.items())
    same = data.make_train_iterator(ex, tok, data.Batching(4, seed=7), num_threads=0)
    for x, y in zip(batches, (next(same) for _ in range(12)), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = next(data.make_train_iterator(ex, tok, data.Batching(4, seed=8)))
    assert not np.array_equal(other["input_ids"], b["input_ids"])
    # Each epoch is a permutation of the examples, shuffled anew.
    rows = _rows(batches)
    everything = sorted(tuple(r) for r in ex["input_ids"])
    assert sorted(rows[:24]) == everything and sorted(rows[24:]) == everything
    assert rows[:24] != rows[24:]
    assert any(np.any(x["labels"] != IGNORE_INDEX) for x in batches)


def test_masking_is_fresh_each_epoch(tok):
    ex = _synthetic_examples(4, length=256)
    it = data.make_train_iterator(ex, tok, data.Batching(4, seed=0))
    first, second = next(it), next(it)
    order = {tuple(r): i for i, r in enumerate(_unmask(first))}
    perm = [order[tuple(r)] for r in _unmask(second)]
    assert not np.array_equal(first["labels"][perm], second["labels"])


def test_train_iterator_resume(tok):
    ex = _synthetic_examples(20)
    uninterrupted = data.make_train_iterator(ex, tok, data.Batching(3, seed=5))
    want = [next(uninterrupted) for _ in range(15)]
    it = data.make_train_iterator(ex, tok, data.Batching(3, seed=5))
    for _ in range(8):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = data.make_train_iterator(ex, tok, data.Batching(3, seed=5))
    resumed.set_state(state)
    for x, y in zip(want[8:], (next(resumed) for _ in range(7)), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_sharding(tok):
    ex = _synthetic_examples(16)
    hosts = [data.make_train_iterator(ex, tok, data.Batching(2, seed=3, shard_index=h, shard_count=2))
             for h in range(2)]
    per_host = [[next(h) for _ in range(4)] for h in hosts]
    rows0, rows1 = _rows(per_host[0]), _rows(per_host[1])
    assert not set(rows0) & set(rows1)
    assert sorted(rows0 + rows1) == sorted(tuple(r) for r in ex["input_ids"])
    # Global batch t is the same with one host of batch 4 as with two hosts of batch 2.
    single = data.make_train_iterator(ex, tok, data.Batching(4, seed=3))
    for t in range(4):
        g = next(single)
        for k in g:
            np.testing.assert_array_equal(g[k], np.concatenate([per_host[0][t][k], per_host[1][t][k]]))
    with pytest.raises(ValueError, match=r"shard_index=2 must lie in \[0, shard_count=2\)"):
        data.make_train_iterator(ex, tok, data.Batching(2, seed=3, shard_index=2, shard_count=2))


def test_train_iterator_position_is_checkpointed(tok, tmp_path):
    """The trainer's Checkpointer stores the iterator's position as it was when the save started."""
    from train.checkpoint import Checkpointer

    ex = _synthetic_examples(10)
    it = data.make_train_iterator(ex, tok, data.Batching(2, seed=1))
    for _ in range(3):
        next(it)
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    state = {"w": np.arange(3.0)}
    ck.save(3, state, it.get_state(), {"step": 3})
    want = [next(it) for _ in range(4)]  # the iterator moves on while the save completes
    ck.close()
    fresh = data.make_train_iterator(ex, tok, data.Batching(2, seed=1))
    restorer = Checkpointer(tmp_path / "ckpt", read_only=True)
    restored, data_state, meta = restorer.restore(restorer.latest_step(), state)
    restorer.close()
    fresh.set_state(data_state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta == {"step": 3}
    for x, y in zip(want, (next(fresh) for _ in range(4)), strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["labels"], y["labels"])


def test_eval_batches(tok):
    ex = _synthetic_examples(10, length=64)
    batches = data.make_eval_batches(ex, tok, data.Batching(4, seed=0))
    again = data.make_eval_batches(ex, tok, data.Batching(4, seed=0))
    assert len(batches) == 3 and all(b["labels"].shape == (4, 64) for b in batches)
    for x, y in zip(batches, again, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert np.all(batches[-1]["labels"][2:] == IGNORE_INDEX)  # filler rows add no loss
    assert sorted(_rows(batches)[:10]) == sorted(tuple(r) for r in ex["input_ids"])
    assert len(data.make_eval_batches(ex, tok, data.Batching(4, seed=0), pad_last=False)[-1]["labels"]) == 2
    halves = [data.make_eval_batches(ex, tok, data.Batching(2, seed=0, shard_index=h, shard_count=2))
              for h in range(2)]
    for t, b in enumerate(batches):
        both = np.concatenate([halves[0][t]["labels"], halves[1][t]["labels"]])
        np.testing.assert_array_equal(b["labels"], both)


def test_load_or_build_examples_caches(tok, tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Some words here. " * 200)
    kwargs = dict(layout="blocks", seq_len=64, block_size=16, min_doc_words=10)
    first = data.load_or_build_examples(str(tmp_path / "corpus"), tok, str(tmp_path / "cache"), **kwargs)
    monkeypatch.setattr(data, "build_examples", lambda *a, **k: pytest.fail("cache not used"))
    second = data.load_or_build_examples(str(tmp_path / "corpus"), tok, str(tmp_path / "cache"), **kwargs)
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    assert data.examples_fingerprint(first) == data.examples_fingerprint(second)
    changed = dict(first, input_ids=first["input_ids"].copy())
    changed["input_ids"][0, 1] += 1
    assert data.examples_fingerprint(changed) != data.examples_fingerprint(first)
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".npz")]) == 1
