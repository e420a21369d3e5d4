"""The fine-tuning program: ``python -m train.finetune --task TASK --init MODEL --data DATA --output-dir DIR``.

Tasks (``--task``): ``document-classification`` (single-label, or ``--multi-label``; ``--pooling`` of the
block starts: ``max``, ``attentive``, ``first``, ``last``, or ``cls``: HF's classifier on ``<s>``),
``sequential-sentence-classification`` (a label, or with ``--multi-label`` a label set, per block),
``multiple-choice`` (``--choice-scoring cls``: HF's head on ``<s>`` of each choice's row; ``masked-lm``: the
masked-LM head at the context's ``<mask>``, for cloze-style tasks), ``question-answering`` (extractive) and
``token-classification``. The records and
how they are laid out: ``train.finetune_data``; the predictions and their scores: ``train.finetune_eval``.

``--init``: an HF directory or hub id, a Flax checkpoint, a pretraining run directory (its latest
checkpoint, its tokenizer and its layout: a model is fine-tuned on exactly the layout it was pretrained
on) or a fine-tuning run directory (its ``best/``). A new head is initialised as ``transformers`` does.

It trains with the pretraining program's trainer (``train.trainer`` drivers: ``--driver mesh|pmap``,
``--dtype bfloat16``, ``--remat``, ``--grad-accum-steps``; ``train.loop``: Orbax checkpoints with exact
resume, SIGTERM save, progress bar, TensorBoard, ``metrics.jsonl``, ``curves.png``), evaluates on the
validation split every epoch (or ``--eval-every`` steps) and stops early after ``--patience``
evaluations without a better ``--best-metric``. A finished run leaves:

  DIR/config.json          the resolved settings;   DIR/model/config.json the model's HF config (with its head)
  DIR/tokenizer/           the tokenizer;           DIR/checkpoints/ Orbax steps (resume)
  DIR/best/                the best evaluation's model as a Flax checkpoint (every head; what --init and
                           --predict take), config.json holding id2label/label2id and the "finetuning" settings
  DIR/hf/                  the same as an HF directory, where transformers has the head (sequence classification
                           = --pooling cls, token classification, multiple choice, question answering; masked LM
                           for --choice-scoring masked-lm)
  DIR/eval_results.json    validation (best step) and test metrics, the per-label report, truncation counts
  DIR/predictions.jsonl    one {"id", "prediction", "scores"} per test record (with --test)
  DIR/metrics.jsonl, DIR/tb/, DIR/curves.png

``--predict --init RUN/best --data docs.jsonl [--predictions FILE]`` writes predictions (stdout by default)
with the layout the model was fine-tuned on, and scores them when the records hold targets.
Presets (``--preset``): ``hat`` (the authors' recipe, the default), ``hat-ecthr``, ``hat-quality``,
``hat-contractnli``, ``hat-ecthr-arguments``, ``hat-mimic``, ``demo`` (a few CPU minutes on the offline tasks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

import jax
import numpy as np

from longformer_jax.inputs import pow2_bucket
from longformer_jax.pretrained import load_checkpoint, load_flax_checkpoint
from longformer_jax.state_dict import convert_params, params_from_state_dict, state_dict_from_params
from longformer_jax.tasks import TASKS, build_model
from train import aot, export, trainer
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import data as data_lib
from train import finetune_data as fd
from train import finetune_eval as fe
from train import metrics as metrics_lib
from train.config import TrainConfig
from train.loop import LoopResult, NonFiniteError, TrainLoop

POOLINGS = ("max", "attentive", "first", "last", "cls")
CHOICE_SCORINGS = fe.CHOICE_SCORINGS
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "tb",
    "hf",
    "best",
    "curves.png",
    "eval_results.json",
    "predictions.jsonl",
    data_lib.RUN_TOKENIZER_DIR,
    export.MODEL_DIR,
)
# TrainConfig settings fine-tuning does not use (left out of its command line).
_UNUSED = (
    "tokenizer_vocab_size",
    "min_doc_tokens",
    "eval_docs",
    "mlm_probability",
    "fill_mask_text",
    "log_batch_fingerprints",
    "eval_batches",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
)
_FIELDS = tuple(f"{f.name}_field" for f in dataclasses.fields(fd.Fields))


@dataclasses.dataclass
class FinetuneConfig(TrainConfig):
    """Every setting of a fine-tuning run: `TrainConfig`'s (optimizer, drivers, checkpoints) and the task's.

    ``layout``, ``seq_len`` and ``block_size`` default (None) to the pretraining run's (``--init`` a run
    directory), the fine-tuned model's, else the blocks layout, up to 4096 tokens, blocks of 128;
    ``max_steps`` to ``epochs`` epochs, ``eval_every`` to one epoch, ``save_every`` to ``eval_every``.
    Field names (``*_field``) default to ``train.finetune_data.Fields`` (or, predicting, to the model's).
    """

    task: str = "document-classification"
    data: str | None = None  # train records: a file, a task folder, hf:NAME[:CONFIG[:SPLIT]]
    validation: str | None = None  # None: the task folder's / dataset's validation split, else eval_fraction of train
    test: str | None = None  # None: the task folder's test split (if any)
    labels: str | None = None  # label names, one per line (None: the task folder's labels.txt, else from the data)
    multi_label: bool = False
    pooling: str = "max"  # document classification: max | attentive | first | last (block starts) | cls (<s>)
    choice_scoring: str = "cls"  # multiple choice: cls (HF's head on <s>) | masked-lm (the LM head at the <mask>)
    id_field: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    labels_field: str | None = None
    choices_field: str | None = None
    question_field: str | None = None
    context_field: str | None = None
    answers_field: str | None = None
    pair_field: str | None = None  # document classification: a second text in the last block (e.g. an NLI hypothesis)
    epochs: int = 20
    patience: int = 3  # evaluations without improvement before stopping; 0: never stop early
    best_metric: str | None = None  # None: micro_f1 (accuracy for multiple choice, f1 for question answering)
    max_answer_tokens: int = 30
    max_negative_windows: int | None = None  # question answering: training windows without the answer kept per
    # question (None: all, as transformers)
    eval_batch_size: int | None = None  # None: batch_size
    predict: bool = False  # predict --data with the model --init (no training)
    predictions: str | None = None  # --predict: the output file (None: stdout)
    layout: str | None = None
    seq_len: int | None = None
    block_size: int | None = None
    max_steps: int | None = None
    eval_every: int | None = None
    save_every: int | None = None
    eval_fraction: float = 0.1
    output_dir: str = "runs/finetune"

    RESUMABLE_CHANGES: typing.ClassVar[tuple[str, ...]] = (
        *TrainConfig.RESUMABLE_CHANGES,
        "test",
        "eval_batch_size",
        "predict",
        "predictions",
    )

    @property
    def resolved(self) -> bool:
        return all(
            getattr(self, k) is not None
            for k in ("layout", "seq_len", "block_size", "max_steps", "eval_every", "save_every")
        )

    @property
    def fields(self) -> fd.Fields:
        given = {f[: -len("_field")]: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None}
        return fd.Fields(**given)

    @property
    def model_task(self) -> str:
        return fe.model_task_of(self.task, self.pooling, self.choice_scoring)

    def validate(self) -> None:
        checks = (
            (self.task in fd.TASK_NAMES, f"task={self.task!r}; expected one of {', '.join(fd.TASK_NAMES)} (--task)."),
            (self.pooling in POOLINGS, f"pooling={self.pooling!r}; expected one of {', '.join(POOLINGS)} (--pooling)."),
            (
                self.choice_scoring in CHOICE_SCORINGS,
                f"choice_scoring={self.choice_scoring!r}; expected one of {', '.join(CHOICE_SCORINGS)} "
                "(--choice-scoring).",
            ),
            (
                self.choice_scoring == "cls" or self.task == "multiple-choice",
                f"--choice-scoring {self.choice_scoring} applies to multiple choice, not {self.task}; leave it out.",
            ),
            (
                self.data is not None,
                "--data is required: the records to train on (or, with --predict, to predict): "
                "a .jsonl/.csv/.parquet file, a task folder or hf:NAME[:CONFIG[:SPLIT]].",
            ),
            (
                self.init is not None,
                "--init is required: the model to fine-tune (an HF directory or hub id, a Flax "
                "checkpoint, or a pretraining run directory).",
            ),
            (
                self.epochs >= 1 and self.patience >= 0,
                f"epochs={self.epochs} must be >= 1 and patience={self.patience} >= 0.",
            ),
            (
                self.best_metric in (None, "accuracy", "micro_f1", "macro_f1", "f1", "exact_match"),
                f"best_metric={self.best_metric!r}; expected accuracy, micro_f1, macro_f1, f1 or exact_match.",
            ),
        )
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.resolved:
            super().validate()

    @property
    def num_global_slots(self) -> int:  # fine-tuning counts them from the laid-out data
        raise AttributeError("FinetuneConfig has no num_global_slots: see train.finetune_eval.global_slots")


_HAT = dict(
    # The fine-tuning recipe of coastalcph/hierarchical-transformers (running_scripts/fine_tuning/): AdamW
    # lr 1e-5, linear schedule with 5% warmup, up to 20 epochs, early stopping with patience 3 on validation
    # micro-F1 (accuracy for multiple choice), batch 32; TrainingArguments' defaults otherwise (no weight
    # decay, clipping at 1.0).
    preset="hat",
    learning_rate=1e-5,
    warmup_fraction=0.05,
    weight_decay=0.0,
    clip_norm=1.0,
    epochs=20,
    patience=3,
    batch_size=32,
    grad_accum_steps=1,
    seed=42,
    dropout=True,
    dtype="float32",
    output_dir="runs/finetune",
    log_every=10,
    keep_checkpoints=2,
)
_SEED = dict(
    init="kiddothe2b/longformer-base-4096", layout="blocks", seq_len=4096, block_size=128, dtype="bfloat16", remat=True
)
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "hat": _HAT,
    # LexGLUE ECtHR-B (multi-label, max pooling; Longformer-base: 79.4 micro-F1 / 71.7 macro-F1).
    "hat-ecthr": {
        **_HAT,
        **_SEED,
        "preset": "hat-ecthr",
        "task": "document-classification",
        "multi_label": True,
        "pooling": "max",
        "data": "hf:lex_glue:ecthr_b",
        "test": "hf:lex_glue:ecthr_b:test",
        "batch_size": 8,
        "grad_accum_steps": 4,
    },
    # MIMIC-III (multi-label, max pooling, batch 8); the data needs credentialed access: give --data.
    "hat-mimic": {
        **_HAT,
        **_SEED,
        "preset": "hat-mimic",
        "task": "document-classification",
        "multi_label": True,
        "pooling": "max",
        "batch_size": 8,
    },
    # ContractNLI: the hypothesis in the last block, last-block pooling; give --data (the authors' local copy).
    "hat-contractnli": {
        **_HAT,
        **_SEED,
        "preset": "hat-contractnli",
        "task": "document-classification",
        "pooling": "last",
        "text_field": "premise",
        "pair_field": "hypothesis",
        "batch_size": 8,
        "grad_accum_steps": 4,
    },
    # QuALITY multiple choice (batch 2 x 4, accuracy): give --data (article, question, options, 0-based label).
    "hat-quality": {
        **_HAT,
        **_SEED,
        "preset": "hat-quality",
        "task": "multiple-choice",
        "text_field": "article",
        "choices_field": "options",
        "batch_size": 2,
        "grad_accum_steps": 4,
    },
    # ECtHR arguments: a label set per paragraph (lr 3e-5, batch 2 x 4); give --data.
    "hat-ecthr-arguments": {
        **_HAT,
        **_SEED,
        "preset": "hat-ecthr-arguments",
        "task": "sequential-sentence-classification",
        "multi_label": True,
        "learning_rate": 3e-5,
        "batch_size": 2,
        "grad_accum_steps": 4,
    },
    # A few CPU minutes on the offline tasks (python -m train.demo_tasks) from a `make demo` model.
    "demo": {
        **_HAT,
        "preset": "demo",
        "learning_rate": 1e-4,
        "warmup_fraction": 0.1,
        "epochs": 3,
        "patience": 3,
        "batch_size": 8,
        "output_dir": "runs/finetune-demo",
        "log_every": 5,
    },
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 1, as every bad input here
        self.exit(1, f"error: {message} (see python -m train.finetune --help)\n")


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    parser = config_lib.build_parser(
        FinetuneConfig,
        FINETUNE_PRESETS,
        prog="python -m train.finetune",
        default_preset="hat",
        description=__doc__.split("\n\n")[0],
        hidden=_UNUSED,
        parser_class=_Parser,
    )
    return config_lib.parse_args(argv, FinetuneConfig, FINETUNE_PRESETS, parser)


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Splits:
    train: fd.Records | None
    validation: fd.Records | None
    test: fd.Records | None
    labels_file: str | None


def _hold_out(records: fd.Records, fraction: float, seed: int) -> tuple[fd.Records, fd.Records]:
    n = len(records.rows)
    k = int(fraction) if fraction >= 1 else max(1, round(fraction * n))
    if not 0 < k < n:
        raise fd.DataError(f"{records.source}: cannot hold out {k} of {n} records for validation; give --validation")
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    pick = lambda keep: [r for i, r in enumerate(records.rows) if (i in held) != keep]  # noqa: E731
    return (
        fd.Records(pick(True), records.source, records.class_names),
        fd.Records(pick(False), f"{records.source} (held out)", records.class_names),
    )


def read_splits(cfg: FinetuneConfig, log) -> Splits:
    """The train, validation and test records and the labels file the settings name (see FinetuneConfig)."""
    data = str(cfg.data)
    folder = fd.task_folder_files(data) if Path(data).is_dir() else None
    train = fd.read_records(data, "train")
    val, test, labels = cfg.validation, cfg.test, cfg.labels
    if folder is not None:
        val = val or (str(folder["validation"]) if folder["validation"] else None)
        test = test or (str(folder["test"]) if folder["test"] else None)
        labels = labels or (str(folder["labels"]) if folder["labels"] else None)
    validation = fd.read_records(val, "validation") if val else None
    if validation is None and data.startswith("hf:") and len(data[3:].split(":")) < 3:
        try:
            validation = fd.read_records(data, "validation")
        except fd.DataError as e:
            log(f"note: {e}; holding out part of the training records instead")
    if validation is None:
        train, validation = _hold_out(train, cfg.eval_fraction, cfg.seed)
        log(f"validation: {len(validation.rows)} records held out of {data} (--eval-fraction {cfg.eval_fraction})")
    return Splits(train, validation, fd.read_records(test, "test") if test else None, labels)


def label_set(cfg: FinetuneConfig, splits: Splits, init_labels: list[str] | None) -> fd.LabelSet | None:
    """The labels: --labels / the folder's labels.txt, the dataset's class names, the checkpoint's, or the data's."""
    if cfg.task not in fd.LABELLED_TASKS:
        return None
    fields = cfg.fields
    name = fields.labels if cfg.multi_label or cfg.task != "document-classification" else fields.label
    if splits.labels_file:
        labels = fd.LabelSet.from_file(splits.labels_file)
    elif name in splits.train.class_names:
        labels = fd.LabelSet(tuple(splits.train.class_names[name]), f"{splits.train.source} ({name!r} names)")
    elif init_labels:
        labels = fd.LabelSet(tuple(init_labels), f"{cfg.init} (id2label)")
    else:
        values = []
        for i, row in enumerate(splits.train.rows):
            if name not in row:
                raise fd.DataError(
                    f"{splits.train.where(i)}: no field {name!r} (fields: {sorted(row)}); name the "
                    f"label field with --{'labels' if name == fields.labels else 'label'}-field"
                )
            v = row[name]
            nested = cfg.task != "document-classification" and cfg.multi_label
            flat = [x for item in v for x in item] if nested else (v if isinstance(v, list) else [v])
            values += flat
        labels = fd.LabelSet.from_values(values, f"{splits.train.source} ({name!r})")
    if init_labels and sorted(init_labels) != sorted(labels.names):
        raise fd.DataError(
            f"the labels of {labels.source} ({', '.join(labels.names[:10])}) differ from those of the "
            f"checkpoint {cfg.init} ({', '.join(init_labels[:10])}); pass --labels with the "
            "checkpoint's labels, or fine-tune from a model without this head"
        )
    return fd.LabelSet(tuple(init_labels), labels.source) if init_labels else labels


# ----------------------------------------------------------------------------------------------
# The model to start from


@dataclasses.dataclass
class Init:
    config: Any  # LongformerConfig of the checkpoint (its own head)
    task: str  # the checkpoint's head
    params: Any
    tokenizer_source: str
    layout: dict[str, Any]  # layout, seq_len, block_size the checkpoint was trained on (may be empty)
    labels: list[str] | None = None  # the checkpoint's label names when it has this run's head
    same_head: bool = False  # the checkpoint was fine-tuned for this task (head kind, pooling, labels)


def _is_run_dir(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / export.MODEL_DIR / "config.json").is_file()
        and (path / "checkpoints").is_dir()
    )


def load_init(cfg: FinetuneConfig) -> Init:
    """The checkpoint ``--init`` names, with the layout it was trained on where known."""
    path = Path(str(cfg.init)).expanduser()
    options = cfg.model_options()
    if _is_run_dir(path) and (path / "best").is_dir():  # a fine-tuning run: its best model
        path = path / "best"
    if _is_run_dir(path):
        run_cfg = TrainConfig.load(path / "config.json")
        config, task, params, _ = export.restore_run_params(path)
        scan = options.pop("scan_layers")
        config = config.replace(**options)
        if scan != config.scan_layers:
            config, params = convert_params(params, config, task, scan_layers=scan, allow_new_head=False)
        tok = path / data_lib.RUN_TOKENIZER_DIR
        layout = {"layout": run_cfg.layout, "seq_len": run_cfg.seq_len, "block_size": run_cfg.block_size}
        return Init(config, task, params, str(tok if data_lib.has_tokenizer_files(tok) else run_cfg.tokenizer), layout)
    config, task, params, directory = load_checkpoint(str(path), **options)
    saved = config.extra.get(fe.SETTINGS_KEY) or {}
    layout = {k: saved[k] for k in ("layout", "seq_len", "block_size") if k in saved}
    same = (
        task == cfg.model_task
        and saved.get("task") == cfg.task
        and saved.get("pooling") == cfg.pooling
        and saved.get("choice_scoring", "cls") == cfg.choice_scoring
        and bool(saved.get("multi_label")) == cfg.multi_label
    )
    labels = [config.id2label[i] for i in range(config.num_labels)] if same and config.id2label else None
    return Init(config, task, params, str(directory), layout, labels, same)


def resolve_layout(cfg: FinetuneConfig, init: Init) -> FinetuneConfig:
    """``layout``, ``seq_len``, ``block_size``: given, else the checkpoint's, else blocks / <= 4096 / 128."""
    limit = init.config.max_sequence_length
    defaults = {"layout": "blocks", "seq_len": None, "block_size": 128, **init.layout}
    layout = cfg.layout or defaults["layout"]
    block = cfg.block_size or defaults["block_size"]
    seq_len = cfg.seq_len or defaults["seq_len"]
    if seq_len is None:
        seq_len = min(4096, limit)
        seq_len -= seq_len % (block if layout == "blocks" else init.config.max_window)
    if seq_len > limit:
        raise ValueError(f"seq_len={seq_len} is longer than {cfg.init} allows ({limit} tokens); lower --seq-len")
    return cfg.replace(layout=layout, seq_len=seq_len, block_size=block)


def head_config(cfg: FinetuneConfig, init: Init, labels: fd.LabelSet | None) -> Any:
    """The model config with this run's head: labels, problem type, pooling, block size, fine-tuning settings."""
    settings = fe.FinetuneSettings(
        cfg.task,
        cfg.layout,
        cfg.seq_len,
        cfg.block_size,
        cfg.multi_label,
        cfg.pooling,
        cfg.max_answer_tokens,
        {k: v for k, v in dataclasses.asdict(cfg.fields).items()},
        cfg.choice_scoring,
    )
    extra = {**init.config.extra, fe.SETTINGS_KEY: settings.to_dict()}
    if cfg.model_task in ("document-classification", "sequential-sentence-classification"):
        extra["sentence_block_size"] = cfg.block_size
    if cfg.model_task == "document-classification":
        extra["pooling"] = cfg.pooling
    changes: dict[str, Any] = {"extra": extra}
    if labels is not None:
        changes.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels.names)),
            label2id={n: i for i, n in enumerate(labels.names)},
            problem_type="multi_label_classification" if cfg.multi_label else "single_label_classification",
        )
    return init.config.replace(**changes)


def model_params(cfg: FinetuneConfig, init: Init, config: Any) -> Any:
    """The checkpoint's parameters with this run's head: kept when the checkpoint was fine-tuned for the same
    task (and labels), else a new head on its encoder (initialised as ``transformers`` does)."""
    if init.same_head or cfg.model_task == init.task == "masked-lm":  # masked-LM scoring keeps the LM head
        return init.params
    if cfg.model_task == "masked-lm":
        raise ValueError(
            f"--choice-scoring masked-lm fine-tunes the masked-LM head of --init, and {cfg.init} is a "
            f"{init.task!r} model without one; start from a masked-LM checkpoint or use --choice-scoring cls"
        )
    state = state_dict_from_params(init.params, init.config, init.task)
    encoder = {k: v for k, v in state.items() if k.split(".")[0] in ("longformer", "embeddings", "encoder", "pooler")}
    return params_from_state_dict(
        encoder, config, cfg.model_task, rng=jax.random.PRNGKey(cfg.seed), allow_new_head=True, source=str(cfg.init)
    )


# ----------------------------------------------------------------------------------------------
# Setup


@dataclasses.dataclass
class Run:
    """Everything a fine-tuning run needs before its first step."""

    cfg: FinetuneConfig
    out: Path
    tok: Any
    labels: fd.LabelSet | None
    settings: fe.FinetuneSettings
    config: Any  # the model's LongformerConfig, with this run's head
    model: Any
    driver: trainer.Driver
    ckpt: ckpt_lib.Checkpointer
    train_it: Any
    encoded: dict[str, fd.Encoded]
    batches: dict[str, list[dict[str, np.ndarray]]]
    truncation: dict[str, fd.Truncation]
    params: Any  # the initial parameters (host)
    key: np.ndarray  # the run's dropout key


def resolve_schedule(cfg: FinetuneConfig, num_train: int) -> FinetuneConfig:
    """``max_steps`` (``epochs`` epochs), ``eval_every`` (an epoch) and ``save_every`` (each evaluation)."""
    per_epoch = max(1, num_train // cfg.global_batch_size)
    max_steps = cfg.max_steps or cfg.epochs * per_epoch
    eval_every = cfg.eval_every or per_epoch
    return cfg.replace(max_steps=max_steps, eval_every=eval_every, save_every=cfg.save_every or eval_every)


def prepare_output_dir(cfg: FinetuneConfig, out: Path) -> None:
    """With --overwrite, deletes a previous run's files; else refuses another run's checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        ckpt_lib.remove_run_files(out, RUN_FILES)
    else:
        ckpt_lib.check_resumable(cfg, out)


def encode_splits(cfg: FinetuneConfig, splits: Splits, tok: Any, labels: fd.LabelSet | None, log):
    """(encoded splits, their truncation reports), each report printed."""
    layout = fd.Layout(cfg.layout, cfg.seq_len, cfg.block_size, *_special_ids(tok))
    encoded, reports = {}, {}
    for split in ("train", "validation", "test"):
        records = getattr(splits, split)
        if records is None:
            continue
        encoder = fd.TaskEncoder(cfg.task, tok, layout, cfg.fields, labels, cfg.multi_label, cfg.choice_scoring)
        enc = encoder.encode(records, split)
        if split == "train" and cfg.max_negative_windows is not None and cfg.task == "question-answering":
            enc = fd.limit_negative_windows(enc, cfg.max_negative_windows, cfg.seed)
        encoded[split], reports[split] = enc, encoder.report
        for line in encoder.report.lines(len(records.rows), split):
            log(f"note: {line}")
    return encoded, reports


def _special_ids(tok: Any) -> tuple[int, int, int]:
    ids = data_lib.token_ids(tok)
    return ids.bos, ids.eos, ids.pad


def setup(cfg: FinetuneConfig, log) -> Run:
    """Records, checkpoint, labels, tokenizer, laid-out examples, model, driver and checkpointer of a run."""
    if jax.process_count() > 1:
        raise ValueError("fine-tuning runs on one host (any number of its devices); start it without jax.distributed")
    splits = read_splits(cfg, log)
    init = load_init(cfg)
    cfg = resolve_layout(cfg, init)
    labels = label_set(cfg, splits, init.labels)
    tok = data_lib.load_tokenizer(cfg.tokenizer or init.tokenizer_source, model_max_length=cfg.seq_len)
    config = head_config(cfg, init, labels)
    if len(tok) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens but {cfg.init} only vocab_size={config.vocab_size}; "
            "use the model's own tokenizer (--tokenizer)"
        )
    encoded, reports = encode_splits(cfg, splits, tok, labels, log)
    cfg = resolve_schedule(cfg, len(encoded["train"]))
    cfg.validate()
    out = Path(cfg.output_dir).absolute()
    prepare_output_dir(cfg, out)
    model = build_model(config, cfg.model_task)
    slots = fe.global_slots(*(e.arrays for e in encoded.values()))
    tx, schedule = trainer.make_optimizer(cfg)
    driver = trainer.make_driver(
        cfg, model, tx, fe.objective_for(cfg.task, slots, cfg.multi_label, cfg.choice_scoring), schedule
    )
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    if eval_batch % driver.num_devices:
        raise ValueError(f"eval_batch_size={eval_batch} is not divisible by the {driver.num_devices} devices")
    batches = {s: fd.eval_batches(e.arrays, eval_batch) for s, e in encoded.items() if s != "train"}
    ckpt = ckpt_lib.Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
    train_it = fd.train_iterator(encoded["train"].arrays, cfg.batch_size, cfg.seed)
    settings = fe.FinetuneSettings.from_dict(config.extra[fe.SETTINGS_KEY])
    key = np.asarray(jax.device_get(jax.random.split(jax.random.PRNGKey(cfg.seed))[1]))
    return Run(
        cfg,
        out,
        tok,
        labels,
        settings,
        config,
        model,
        driver,
        ckpt,
        train_it,
        encoded,
        batches,
        reports,
        model_params(cfg, init, config),
        key,
    )


# Label counts of the presets' datasets, for sizing a run without reading its data (--compile-only).
KNOWN_NUM_LABELS = {"hf:lex_glue:ecthr_b": 10, "hf:lex_glue:ecthr_a": 10}


def compile_plan(cfg: FinetuneConfig, num_labels: int | None = None) -> aot.Plan:
    """What ``--target NAME --compile-only`` compiles: this run's model, head, objective and batch shapes, from
    the config.json of ``--init`` (`train.aot.model_config`, never its weights) and the settings; no data read."""
    config = aot.model_config(cfg.replace(seq_len=cfg.seq_len or 4096))
    init = Init(config, "masked-lm", None, "", {})
    cfg = resolve_layout(cfg, init)
    if cfg.labels and Path(cfg.labels).is_file():
        num_labels = num_labels or len([n for n in Path(cfg.labels).read_text().splitlines() if n.strip()])
    num_labels = num_labels or KNOWN_NUM_LABELS.get(str(cfg.data))
    needs_labels = cfg.task not in ("question-answering", "multiple-choice")
    if needs_labels and not num_labels:
        raise ValueError(f"--compile-only reads no data: give the number of labels of {cfg.data} (--num-labels N).")
    labels = fd.LabelSet(tuple(f"label_{i}" for i in range(num_labels))) if needs_labels else None
    config = head_config(cfg, init, labels)
    slots = pow2_bucket(cfg.seq_len // cfg.block_size if cfg.layout == "blocks" else 1)
    objective = fe.objective_for(cfg.task, slots, cfg.multi_label, cfg.choice_scoring)
    rows = aot.finetune_row_shapes(cfg, num_labels or 0)
    steps = cfg.max_steps  # None: epochs x the training data's batches, unknown without the data
    cfg = cfg.replace(max_steps=steps or 1, eval_every=cfg.eval_every or 1, save_every=cfg.save_every or 1)
    cfg.validate()
    model = build_model(config, cfg.model_task)
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    return aot.Plan(cfg, model, objective, rows, eval_batch, slots, 0.0, steps, evaluates_by_predict=True)


def write_run_files(r: Run) -> None:
    """DIR/config.json (settings, fingerprint), DIR/model/config.json (the model with its head), DIR/tokenizer."""
    saved = {**r.cfg.to_dict(), "fingerprint": r.cfg.fingerprint()}
    (r.out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    r.config.save_pretrained(r.out / export.MODEL_DIR, architectures=[TASKS[r.cfg.model_task].hf_architecture])
    if not data_lib.has_tokenizer_files(r.out / data_lib.RUN_TOKENIZER_DIR):
        r.tok.save_pretrained(str(r.out / data_lib.RUN_TOKENIZER_DIR))


# ----------------------------------------------------------------------------------------------
# Evaluation, early stopping, the best model


def evaluate_split(r: Run, params: Any, split: str) -> tuple[dict[str, Any], list[dict]]:
    """(metrics with the loss, per-record predictions) of ``split`` with ``params`` (in the driver's layout)."""
    enc = r.encoded[split]
    sums, outputs = fe.collect(r.batches[split], len(enc), lambda b: r.driver.predict(params, b))
    predictions = fe.decode(enc, outputs, r.settings, r.labels)
    metrics: dict[str, Any] = {"loss": trainer.finish_eval(sums)["loss"]}
    if enc.has_gold:
        metrics.update(fe.score(enc, predictions, r.labels, r.settings.multi_label))
    return metrics, predictions


@dataclasses.dataclass
class EarlyStopping:
    """The best validation value of ``metric`` so far (higher is better; ties go to the lower loss), and the
    evaluations since."""

    metric: str
    patience: int
    best: float | None = None
    best_step: int | None = None
    best_loss: float | None = None
    bad: int = 0
    stopped: bool = False

    def update(self, value: float, step: int, loss: float) -> bool:
        """True when ``value`` is the best so far (on a tie, when the loss is lower); counts towards stopping
        otherwise."""
        if self.best is None or value > self.best or (value == self.best and loss < self.best_loss):
            self.best, self.best_step, self.best_loss, self.bad = value, step, loss, 0
            return True
        self.bad += 1
        self.stopped = self.patience > 0 and self.bad >= self.patience
        return False


def write_best(r: Run, host_params: Any) -> None:
    """DIR/best: the model as a Flax checkpoint (replaced atomically)."""
    export.write_model(
        r.out / "best", r.config, host_params, r.tok, task=r.cfg.model_task, output_format="flax", overwrite=True
    )


class FinetuneLoop(TrainLoop):
    """``TrainLoop`` whose evaluations score the validation predictions, keep the best model and stop early."""

    def __init__(self, r: Run, early: EarlyStopping, *, logger, progress):
        super().__init__(
            r.cfg, r.driver, r.ckpt, r.train_it, r.batches["validation"], key=r.key, logger=logger, progress=progress
        )
        self.r, self.early = r, early
        self.best_metrics: dict[str, Any] | None = None  # the validation metrics of the best model, once seen

    def evaluate(self, state, step: int) -> dict[str, float]:
        metrics, _ = evaluate_split(self.r, state.params, "validation")
        scalars = {k: float(v) for k, v in metrics.items() if k != "report"}
        self.logger.write("eval", step, scalars)
        self.progress.write(f"step {step}: validation " + "  ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        e = self.early
        if e.update(scalars[e.metric], step, scalars["loss"]):
            write_best(self.r, self.driver.host_params(state))
            self.best_metrics = metrics
        elif e.stopped:
            self.stop_reason = (
                f"early stopping: validation {e.metric} has not improved on {e.best:.4f} (step "
                f"{e.best_step}) for {e.patience} evaluations"
            )
        return scalars

    def checkpoint_meta(self, step: int) -> dict[str, Any]:
        return {**super().checkpoint_meta(step), "early_stopping": dataclasses.asdict(self.early)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def finish(r: Run, result: LoopResult, early: EarlyStopping, best_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """With the best model: validation (``best_metrics`` when this process evaluated it) and test metrics,
    predictions.jsonl, hf/, eval_results.json, curves.png."""
    _, _, best = load_flax_checkpoint(r.out / "best")
    host = jax.device_get(best)
    params = r.driver.put_params(host)
    results: dict[str, Any] = {
        "task": r.cfg.task,
        "model_task": r.cfg.model_task,
        "best_metric": early.metric,
        "best_step": early.best_step,
        "stopped_early": early.stopped,
        "steps": result.step,
        "labels": list(r.labels.names) if r.labels else None,
        "best_dir": str(r.out / "best"),
        "hf_dir": None,
    }
    results["validation"] = best_metrics or evaluate_split(r, params, "validation")[0]
    if "test" in r.encoded:
        test, predictions = evaluate_split(r, params, "test")
        results["test"] = test
        _write_jsonl(r.out / "predictions.jsonl", predictions)
        results["predictions"] = str(r.out / "predictions.jsonl")
    if TASKS[r.cfg.model_task].auto_class is not None:
        export.write_model(r.out / "hf", r.config, host, r.tok, task=r.cfg.model_task, overwrite=True)
        results["hf_dir"] = str(r.out / "hf")
    results["truncation"] = {split: rep.as_dict() for split, rep in r.truncation.items()}
    tmp = r.out / ".eval_results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(r.out / "eval_results.json")
    metrics_lib.plot_run(
        r.out, loss_label=f"{r.cfg.task} loss", metric=early.metric, metric_label=f"validation {early.metric}"
    )
    return results


# ----------------------------------------------------------------------------------------------
# The run


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: FinetuneConfig, log=_log) -> dict[str, Any]:
    """Fine-tunes (resuming if the output directory holds this run's checkpoints); returns eval_results, with
    ``status`` "finished" (trained to the end or stopped early) or "preempted" (SIGTERM: rerun to resume)."""
    cfg.validate()
    r = setup(cfg, log)
    state, resumed = ckpt_lib.restore_or_init(r.ckpt, r.driver, lambda p: p, r.params, data_iterator=r.train_it)
    r.params = None
    write_run_files(r)
    early = EarlyStopping(r.cfg.best_metric or fe.best_metric_name(r.cfg.task), r.cfg.patience)
    if resumed is not None:
        early = EarlyStopping(**r.ckpt.read_meta(resumed).get("early_stopping", dataclasses.asdict(early)))
    logger = metrics_lib.MetricsLogger(r.out)
    progress = metrics_lib.Progress(r.cfg.max_steps, initial=resumed or 0, enabled=r.cfg.progress_bar)
    c = r.cfg
    progress.write(
        f"{'resuming from step ' + str(resumed) if resumed is not None else 'starting'}: {c.task} "
        f"({c.model_task}), {len(r.encoded['train'])} train / {len(r.encoded['validation'])} validation "
        f"examples of {c.seq_len} tokens ({c.layout} layout), {len(r.labels) if r.labels else 0} labels, "
        f"batch {c.batch_size} x {c.grad_accum_steps}, {c.max_steps} steps, evaluation every "
        f"{c.eval_every}, {r.driver.num_devices} device(s) ({r.driver.name}) -> {r.out}"
    )
    loop = FinetuneLoop(r, early, logger=logger, progress=progress)
    try:
        if early.stopped:
            result = LoopResult(state, int(resumed), "stopped", None, {}, 0.0, 0)
        else:
            result = loop.run(state, resumed or 0)
    finally:
        progress.close()
        r.ckpt.close()
    try:
        if result.status == "preempted":
            return {"status": "preempted", "steps": result.step, "output_dir": str(r.out)}
        return {"status": "finished", "output_dir": str(r.out), **finish(r, result, early, loop.best_metrics)}
    finally:
        logger.close()


def predict(cfg: FinetuneConfig, log=_log) -> dict[str, Any]:
    """``--predict``: the predictions of the model ``--init`` on ``--data``; metrics when the records hold targets."""
    path = Path(str(cfg.init)).expanduser()
    if _is_run_dir(path):
        path = path / "best"
    given = {f[: -len("_field")]: getattr(cfg, f) for f in _FIELDS if getattr(cfg, f) is not None}
    predictor = fe.Predictor(
        path, batch_size=cfg.eval_batch_size or cfg.batch_size, dtype=cfg.dtype, field_overrides=given
    )
    records = fd.read_records(str(cfg.data), "test")
    predictions, enc, encoder = predictor.predict(records)
    for line in encoder.report.lines(len(records.rows), "predict"):
        log(f"note: {line}")
    if cfg.predictions:
        _write_jsonl(Path(cfg.predictions), predictions)
    else:
        for row in predictions:
            print(json.dumps(row, ensure_ascii=False))
    out: dict[str, Any] = {"records": len(predictions), "predictions": cfg.predictions}
    if enc.has_gold:
        out["metrics"] = fe.score(enc, predictions, predictor.labels, predictor.settings.multi_label, report=False)
        log("metrics: " + "  ".join(f"{k} {v:.4f}" for k, v in out["metrics"].items()))
    return out


def _print_summary(s: dict[str, Any]) -> None:
    if s["status"] != "finished":
        print(f"stopped at step {s['steps']} (SIGTERM); rerun the same command to resume")
        return
    for split in ("validation", "test"):
        if split in s:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in s[split].items() if k != "report")
            print(f"{split} (best step {s['best_step']}): {shown}")
    out = Path(s["output_dir"])
    print(f"run directory: {out}")
    print(f"  best model:  {s['best_dir']} (Flax; --init or --predict it)")
    if s["hf_dir"]:
        print(f"  HF model:    {s['hf_dir']} (transformers' {TASKS[s['model_task']].auto_class})")
    print(f"  results:     {out / 'eval_results.json'}" + (f", {s['predictions']}" if s.get("predictions") else ""))
    print(
        f"  metrics:     {out / 'metrics.jsonl'}, {out / 'curves.png'} (TensorBoard: tensorboard --logdir {out / 'tb'})"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        request, argv = aot.split_args(argv)
        cfg = parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (1, its error line already printed)
        return int(e.code or 0)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if request is not None:  # --target NAME --compile-only: sized for the target, nothing trained
        try:
            return aot.main(request, compile_plan(cfg, request.num_labels))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
    try:
        if cfg.predict:
            predict(cfg)
            return 0
        summary = run(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    from longformer_jax import targets
    from longformer_jax.compile_options import use_training_xla_flags

    if "--target" in sys.argv:
        aot.use_cpu_host()  # compiles for another machine: JAX runs on this host's CPU
    use_training_xla_flags()
    targets.start_jax()  # the host's CPU unless it has a GPU or TPU (the aot extra's plugins stay quiet)
    sys.exit(main())
