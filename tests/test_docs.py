"""The documentation is tested: README.md, CHANGELOG.md and every page in docs/.

- Every Python block runs (the blocks of a page in order, in one namespace, in a temporary directory)
  unless the line before its fence is a skip marker (`SKIP_MARKER`). What makes them run in seconds is
  `substitutions()`: the seed checkpoint and the paths the pages use become tiny random local models built
  once per module, the token ids written for the seed's tokenizer become the tiny tokenizer's, sizes shrink.
- Every `python -m MODULE ...` command of a shell block, and of an inline code span, is parsed by that
  program's own argument parser, stopped right after parsing: a renamed flag or module fails here.
- Every relative link and picture points at a file that exists.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import longformer_jax as lj
from longformer_jax.pretrained import save_flax_checkpoint
from tests.finetune_fixtures import TINY_MODEL
from train import data as data_lib

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
# Only these reasons: a block that needs the network or an accelerator.
SKIP_MARKER = re.compile(r"<!-- doc-test: skip \((network|accelerator)\) -->")
SHELL = {"bash", "sh", "shell", "console"}

# The seed's token ids of "<s>Hello I'm a <mask> model.</s>" (the README's example).
SEED_IDS = "[[0, 31414, 38, 437, 10, 50264, 1421, 4, 2]]"
SENTENCE = "Hello I'm a <mask> model."


def substitutions(models: dict[str, str]) -> list[tuple[str, str]]:
    """(text in the docs, text run instead): models and checkpoint paths, token ids, sizes."""
    return [
        ("kiddothe2b/longformer-base-4096", models["hf"]),
        ('"ckpt/flax"', repr(models["flax"])),
        ('"ckpt/long-64k"', repr(models["hf"])),
        ('"runs/my-task/best"', repr(models["classifier"])),
        (SEED_IDS, models["ids"]),
        ("L = 65536", "L = 64"),
        ("sequence=8", "sequence=1"),
    ]


# ------------------------------------------------------------------------------------ reading pages
@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the skip reason written before the fence

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = SKIP_MARKER.search(before)
        blocks.append(Block(page, start + 1, m.group(1).lower(), "\n".join(body), marker and marker.group(1)))
        i += 1
    return blocks


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) of each `python -m` command in a shell block, continuation lines joined."""
    out, joined, first = [], "", None
    for k, ln in enumerate(block.text.splitlines()):
        first = block.line + 1 + k if not joined else first
        joined += ln.rstrip("\\").rstrip() + " " if ln.rstrip().endswith("\\") else ln
        if ln.rstrip().endswith("\\"):
            continue
        cmd = joined.strip()
        joined = ""
        if cmd.startswith("python -m "):
            out.append((first, cmd))
    return out


def inline_commands(page: Path) -> list[tuple[int, str]]:
    """(line, command) of the `python -m ...` inline code spans of a page (outside code blocks)."""
    out, fence = [], False
    for k, ln in enumerate(page.read_text().splitlines()):
        if ln.startswith("```"):
            fence = not fence
        elif not fence:
            out.extend((k + 1, c) for c in re.findall(r"`(python -m [^`]+)`", ln))
    return out


def all_commands() -> list[tuple[str, str]]:
    """(page:line, command) of every shell block's command and every inline span's (`python -m X` in prose,
    without arguments, names the program: only that it exists is checked)."""
    cmds = []
    for page in PAGES:
        rel = page.relative_to(REPO)
        for b in read_blocks(page):
            if b.lang in SHELL and b.skip is None:
                cmds.extend((f"{rel}:{line}", c) for line, c in shell_commands(b))
        cmds.extend((f"{rel}:{line} (inline)", c) for line, c in inline_commands(page))
    return cmds


# ------------------------------------------------------------------------------------ command lines
class _Parsed(BaseException):  # not an Exception: a program's `except Exception` must not catch it
    """Raised right after a program's parser accepted its command line (nothing is run)."""


def command_argv(cmd: str) -> tuple[str, list[str]]:
    """`python -m MODULE ARGS` -> (MODULE, ARGS); shell comments and a bare `...` left out, placeholders of a
    number (`$I`, `N`) read as 0."""
    words = shlex.split(re.sub(r"\$\{?\w+\}?", "0", cmd), comments=True)
    assert words[:2] == ["python", "-m"], cmd
    return words[2], [("0" if re.fullmatch(r"[A-Z]", w) else w) for w in words[3:] if w != "..."]


def program_main(module: str):
    """The `main` function that `python -m module` runs (a package's `__main__`), imported without running
    the module's `if __name__ == "__main__"` block (which may re-execute the process); None if none."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return None
    if spec.submodule_search_locations is not None:  # a package: python -m runs its __main__
        module += ".__main__"
    return getattr(importlib.import_module(module), "main", None)


def parse_only(module: str, args: list[str], monkeypatch) -> str | None:
    """Runs `python -m module args` (its `main(argv)`) up to its argument parser, and no further; None when
    the parser took the command line, else what went wrong (the parser's own message)."""
    main = program_main(module)
    if main is None:
        return f"`python -m {module}`: no program {module!r} (a module with a main function) in this project"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    takes_argv = bool(inspect.signature(main).parameters)
    if not takes_argv and args:
        return f"`python -m {module}` takes no arguments, given {args}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(args) if takes_argv else main()
    except _Parsed:
        return None
    except SystemExit as e:
        if e.code in (0, None) and "--help" in args:
            return None
        return f"`python -m {module}` refused {args}:\n{err.getvalue().strip()}"
    if not takes_argv:
        return None
    return f"`python -m {module}` returned without taking its command line {args}:\n{err.getvalue().strip()}"


@pytest.mark.parametrize(("where", "cmd"), all_commands(), ids=lambda v: v if ":" in v else v.split()[2])
def test_command_lines_parse(where, cmd, monkeypatch):
    module, args = command_argv(cmd)
    if where.endswith("(inline)") and not args:
        assert program_main(module) is not None, f"{where}: {cmd}: no program {module!r} in this project"
        return
    problem = parse_only(module, args, monkeypatch)
    assert problem is None, f"{where}: {cmd}\n{problem}"


def test_a_renamed_flag_or_module_fails():
    """The check can fail: a flag the program lacks and a module that does not exist are both caught."""
    with pytest.MonkeyPatch.context() as mp:
        assert "unrecognized arguments: --no-such-flag" in parse_only("train.metrics", ["r", "--no-such-flag"], mp)
    with pytest.MonkeyPatch.context() as mp:
        assert "no program 'train.no_such_program'" in parse_only("train.no_such_program", [], mp)
    with pytest.MonkeyPatch.context() as mp:
        assert parse_only("train.metrics", ["runs/demo", "--out", "x.png"], mp) is None


# ------------------------------------------------------------------------------------ links
def test_relative_links_and_pictures_exist():
    missing = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
    assert not missing, missing


# ------------------------------------------------------------------------------------ Python blocks
TINY = {**TINY_MODEL, "attention_window": [4, 8], "max_position_embeddings": 130}  # up to 128 tokens


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """A tiny random masked-LM (HF directory and Flax checkpoint) and a document classifier, with a
    byte-level BPE trained on a few sentences (RoBERTa's special tokens; nothing is downloaded)."""
    root = tmp_path_factory.mktemp("doc-models")
    texts = [SENTENCE, "A long document about a model.", "The function returns a new object."] * 20
    tok = data_lib.train_demo_tokenizer(texts, str(root / "tokenizer"), vocab_size=300, min_frequency=1)
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = lj.LongformerConfig(vocab_size=len(tok), sep_token_id=tok.sep_token_id, **special, **TINY)
    mlm = lj.LongformerForMaskedLM(config)
    params = lj.init_params(mlm, 0)
    lj.save_pretrained(root / "hf", mlm, params, tok)
    save_flax_checkpoint(root / "flax", config, params, "masked-lm", tok)
    labels = {0: "short", 1: "long"}
    cls_config = config.replace(num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()})
    cls = lj.build_model(cls_config, "sequence-classification")
    lj.save_pretrained(root / "classifier", cls, lj.init_params(cls, 1), tok)
    ids = tok(SENTENCE)["input_ids"]
    return {
        "hf": str(root / "hf"),
        "flax": str(root / "flax"),
        "classifier": str(root / "classifier"),
        "ids": json.dumps([ids]),
    }


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang == "python" and b.skip is None for b in read_blocks(p))]


@pytest.mark.slow  # a few seconds a page, and the tiny models built once
@pytest.mark.parametrize("page", python_pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_python_blocks_run(page, tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    table = substitutions(tiny_models)
    namespace: dict = {"__name__": "__doc_test__"}
    for block in read_blocks(page):
        if block.lang != "python" or block.skip is not None:
            continue
        code = block.text
        for old, new in table:
            code = code.replace(old, new)
        try:
            exec(compile(code, block.where, "exec"), namespace)  # noqa: S102 - the documentation's own code
        except Exception as e:
            raise AssertionError(f"{block.where}: the Python block fails: {type(e).__name__}: {e}") from e


def test_substitutions_name_text_the_pages_hold():
    """Each substitution still finds its text somewhere: a stale one would hide an untested change."""
    text = "\n".join(b.text for p in PAGES for b in read_blocks(p) if b.lang == "python")
    fake = dict.fromkeys(("hf", "flax", "classifier", "ids"), "x")
    stale = [old for old, _ in substitutions(fake) if old not in text]
    assert not stale, stale


def test_skip_markers_name_a_known_reason():
    bad = []
    for page in PAGES:
        for k, ln in enumerate(page.read_text().splitlines()):
            if "doc-test:" in ln and not SKIP_MARKER.search(ln):
                bad.append(f"{page.relative_to(REPO)}:{k + 1}: {ln.strip()}")
    assert not bad, bad


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make test" in readme and "make demo" in readme
