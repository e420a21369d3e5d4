"""One dataclass with every setting of the training programs, named presets, and the CLI.

`TrainConfig` holds every option; `PRESETS` names complete recipes; `parse_args` builds an
argparse parser from the dataclass fields (one `--flag-name` per field, `--model KEY=VALUE` for
the model, plus `--set key=value` / `--set model.key=value`) so the command line and the saved
`config.json` always carry the same names. `--mesh data=..,fsdp=..,sequence=..` sets the three
mesh settings at once (the same as `--mesh-data`, `--mesh-fsdp`, `--mesh-sequence`).

The model is described once, by `longformer_jax.LongformerConfig`: `TrainConfig.model` is a
mapping of its config.json fields (`{"hidden_size": 128, "attention_window": 64, ...}`) applied
over the base model (the `init` checkpoint's config, or a fresh config whose vocabulary, special
token ids and position table come from the tokenizer and `seq_len`).

A run resumes only with the same settings: `fingerprint_fields()` is every setting except those
in `RESUMABLE_CHANGES` (intervals, paths, driver, mesh, distributed setup, display, compute
dtype and rematerialisation), so a new setting counts unless it is added there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from longformer_jax.config import LongformerConfig
from longformer_jax.sharding import parse_mesh

# JAX-side options of LongformerConfig that are settings of their own here (--dtype, --remat, ...).
_RUN_OPTIONS = ("dtype", "remat", "scan_layers")
# Fields a fresh model takes from the tokenizer: never set by hand.
_TOKENIZER_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id")
MODEL_FIELDS = tuple(
    f.name for f in dataclasses.fields(LongformerConfig) if f.name not in (*_RUN_OPTIONS, *_TOKENIZER_FIELDS, "extra")
)

# The demo's model: a small RoBERTa-style Longformer (one type id, RoBERTa's LayerNorm epsilon); its
# window of 32 tokens is a quarter of the demo's 128-token sequences.
DEMO_MODEL: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "attention_window": 32,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
}
# The seed checkpoint's architecture (SPEC.md): what its own init holds, and a fresh model with --init none.
SEED_MODEL: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "attention_window": 128,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
}


@dataclasses.dataclass
class TrainConfig:
    # ----- which recipe -----
    preset: str = "demo"

    # ----- model: `init` (HF dir, hub id or converted Flax checkpoint) or a fresh one, then `model` -----
    init: str | None = None
    # LongformerConfig (config.json) fields over the base model; see the module docstring.
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    dropout: bool = True  # False: hidden and attention dropout off (deterministic forward)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params always float32)
    remat: bool = False
    scan_layers: bool = False

    # ----- data -----
    # A directory prepared by `python -m train.prepare_data` (its layout settings must match), or raw
    # text (file/dir of .txt/.jsonl/.parquet, hf:NAME[:CONFIG], builtin:python-docs) prepared into
    # RUN_DIR/data by the same code with the settings below.
    data: str = "builtin:python-docs"
    tokenizer: str | None = None  # path or hub id; None: --init's, the prepared data's, or a BPE trained on the corpus
    tokenizer_vocab_size: int = 8192  # for the trained tokenizer
    layout: str = "blocks"  # blocks (sentence blocks, global on block starts) | contiguous
    seq_len: int = 512
    block_size: int = 128  # tokens per sentence block (blocks layout)
    min_doc_tokens: int = 1024  # raw text: documents with fewer subword tokens are dropped
    eval_docs: int = 12  # raw text: the first kept documents held out for evaluation
    eval_batches: int | None = 8  # None: every held-out batch
    mlm_probability: float = 0.15

    # ----- optimisation -----
    batch_size: int = 8  # global micro-batch (examples per forward pass, all devices together)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_steps: int = 300  # optimizer steps
    clip_norm: float | None = 1.0  # None or <= 0: no clipping

    # ----- run -----
    seed: int = 42
    output_dir: str = "runs/demo"
    save_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    overwrite: bool = False  # start over in an output dir that holds another run's checkpoints
    driver: str = "mesh"  # mesh (jax.jit over a Mesh) | pmap
    mesh_data: int = -1  # devices on the data axis; -1: all devices not on fsdp or sequence
    mesh_fsdp: int = 1  # devices on the fsdp axis (parameters sharded where divisible)
    mesh_sequence: int = 1  # devices one document's tokens are split over (longformer_jax.sequence_parallel)
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    fill_mask_text: str | None = None  # fill-mask sentence run at the end (demo)
    progress_bar: bool = True
    log_batch_fingerprints: bool = False  # write a hash of every consumed batch to batches.jsonl

    # ----- derived -----
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.grad_accum_steps

    @property
    def warmup_steps(self) -> int:
        # As TrainingArguments.get_warmup_steps: ceil(max_steps * warmup_ratio).
        return math.ceil(self.max_steps * self.warmup_fraction)

    @property
    def num_global_slots(self) -> int:
        """Static bound of global tokens per row: one per block (blocks layout), none otherwise."""
        return self.seq_len // self.block_size if self.layout == "blocks" else 0

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_options(self) -> dict[str, Any]:
        """LongformerConfig fields of this run: `model`, then dtype / remat / scan_layers and dropout."""
        options = {**self.model, "dtype": self.dtype, "remat": self.remat, "scan_layers": self.scan_layers}
        if not self.dropout:
            options.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return options

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        d = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # Settings a run may change when it resumes; every other one (new ones included) must match.
    RESUMABLE_CHANGES: typing.ClassVar[tuple[str, ...]] = (
        "preset",
        "output_dir",
        "overwrite",
        "save_every",
        "eval_every",
        "log_every",
        "eval_batches",
        "keep_checkpoints",
        "async_checkpointing",
        "driver",
        "mesh_data",
        "mesh_fsdp",
        "mesh_sequence",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
        "fill_mask_text",
        "progress_bar",
        "log_batch_fingerprints",
        "dtype",
        "remat",
    )

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that decide what a checkpoint means; model fields as `model.<name>`."""
        d = self.to_dict()
        out = {k: v for k, v in d.items() if k not in self.RESUMABLE_CHANGES and k != "model"}
        out.update({f"model.{k}": v for k, v in d["model"].items()})
        return out

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """`{setting: (other's value, this value)}` for every fingerprinted setting that differs."""
        mine, theirs = self.fingerprint_fields(), other.fingerprint_fields()
        return {
            k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> None:
        def fail(msg: str):
            raise ValueError(msg)

        if self.layout not in ("blocks", "contiguous"):
            fail(f"layout={self.layout!r}; expected 'blocks' or 'contiguous' (--layout).")
        if self.driver not in ("mesh", "pmap"):
            fail(f"driver={self.driver!r}; expected 'mesh' or 'pmap' (--driver).")
        if self.dtype not in ("float32", "bfloat16"):
            fail(f"dtype={self.dtype!r}; expected 'float32' or 'bfloat16' (--dtype).")
        for name in (
            "batch_size",
            "grad_accum_steps",
            "max_steps",
            "seq_len",
            "block_size",
            "save_every",
            "eval_every",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                fail(f"{name}={getattr(self, name)}; expected an integer >= 1 (--{_flag(name)}).")
        if self.layout == "blocks" and self.seq_len % self.block_size:
            ok = self.seq_len // self.block_size * self.block_size or self.block_size
            fail(
                f"seq_len={self.seq_len} is not a multiple of block_size={self.block_size}; the "
                f"blocks layout needs whole blocks: use --seq-len {ok}."
            )
        self._validate_model()
        if not 0.0 <= self.warmup_fraction <= 1.0:
            fail(f"warmup_fraction={self.warmup_fraction}; expected a value in [0, 1].")
        if not 0.0 < self.mlm_probability < 1.0:
            fail(f"mlm_probability={self.mlm_probability}; expected a value in (0, 1).")
        for name in ("min_doc_tokens", "eval_docs"):
            if getattr(self, name) < 0:
                fail(f"{name}={getattr(self, name)}; expected an integer >= 0 (--{_flag(name)}).")
        if self.mesh_fsdp < 1 or self.mesh_sequence < 1 or (self.mesh_data < 1 and self.mesh_data != -1):
            fail(
                f"mesh shape (data={self.mesh_data}, fsdp={self.mesh_fsdp}, sequence={self.mesh_sequence}) is "
                "invalid; use --mesh data=N,fsdp=M,sequence=S with N >= 1 (or -1 for all remaining devices) "
                "and M, S >= 1."
            )
        if self.mesh_sequence > 1 and self.driver != "mesh":
            fail(
                f"mesh_sequence={self.mesh_sequence} needs the mesh driver (--driver mesh); the pmap driver "
                "only splits the batch."
            )

    def _validate_model(self) -> None:
        for key in self.model:
            check_model_field(key)
        if self.init is not None:
            return  # the base is the checkpoint's config, read when the run starts
        try:
            probe = LongformerConfig(**{"max_position_embeddings": self.seq_len + 2, **self.model_options()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"--model: {e}") from None
        if self.seq_len % probe.max_window:
            raise ValueError(
                f"seq_len={self.seq_len} is not a multiple of the model's attention window "
                f"{probe.max_window}; pick --seq-len as a multiple of the window."
            )
        step = self.mesh_sequence * probe.pad_multiple  # the window, times the dilation where one is set
        if self.mesh_sequence > 1 and self.seq_len % step:
            raise ValueError(
                f"seq_len={self.seq_len} does not split into whole attention windows over the "
                f"{self.mesh_sequence} devices of the sequence axis; pick --seq-len as a multiple of "
                f"{self.mesh_sequence} x {probe.pad_multiple} = {step} (the window times its dilation)."
            )


# ----------------------------------------------------------------------------------------------
# Presets

_SEED_RECIPE = dict(
    # kiddothe2b/longformer-base-4096: continued MLM pretraining on C4, 50k steps (SPEC.md).
    preset="seed-recipe",
    init="kiddothe2b/longformer-base-4096",
    model=SEED_MODEL,
    tokenizer=None,  # None with --init: the tokenizer saved beside the initial model
    # C4 `en` prepared once by `python -m train.prepare_data ... --output data/c4` (docs/pretraining.md): shards
    # streamed by every host, documents of at least 1,024 subword tokens, 1,000 held out.
    data="data/c4",
    layout="blocks",
    seq_len=4096,
    block_size=128,
    min_doc_tokens=1024,
    eval_docs=1000,
    eval_batches=50,
    mlm_probability=0.15,
    batch_size=16,
    grad_accum_steps=8,
    learning_rate=1e-4,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_eps=1e-8,
    weight_decay=0.01,
    warmup_fraction=0.1,
    max_steps=50_000,
    clip_norm=1.0,
    seed=42,
    dropout=True,
    dtype="bfloat16",
    remat=True,
    output_dir="runs/seed-recipe",
    save_every=1000,
    eval_every=1000,
    log_every=50,
    keep_checkpoints=3,
)

_DEMO = dict(
    # A small model that gets past the frequent-token stage (its fill-mask answers are words that fit,
    # not newlines and punctuation) in a few minutes on 2 CPU cores, offline. What gets it there in
    # that budget: a small vocabulary (each token seen often), short sequences (4 sentence blocks of
    # 32 tokens: few position embeddings to learn, many updates per second), 30% of the tokens masked
    # (the LM head runs only at the masked slots, so more labels per step cost little), a high
    # learning rate without dropout, and enough steps: its eval loss falls steeply between about
    # steps 750 and 1,250, when it starts to use its neighbours (docs/pretraining.md, docs/demo_curves.png).
    preset="demo",
    init=None,
    tokenizer=None,
    tokenizer_vocab_size=2048,
    model=DEMO_MODEL,
    data="builtin:python-docs",
    layout="blocks",
    seq_len=128,
    block_size=32,
    min_doc_tokens=400,
    eval_docs=12,
    eval_batches=8,
    mlm_probability=0.3,
    batch_size=16,
    grad_accum_steps=1,
    learning_rate=3e-3,
    weight_decay=0.01,
    warmup_fraction=0.1,
    max_steps=3000,
    clip_norm=1.0,
    seed=42,
    dropout=False,
    dtype="float32",
    output_dir="runs/demo",
    save_every=100,
    eval_every=100,
    log_every=10,
    keep_checkpoints=3,
    fill_mask_text="The function returns a new <mask> object.",
)

PRESETS: dict[str, dict[str, Any]] = {"seed-recipe": _SEED_RECIPE, "demo": _DEMO}


def preset(name: str, **overrides) -> TrainConfig:
    """The preset's settings with `overrides`; a `model` override is merged into the preset's model.

    A preset's model describes the model of the preset's own `init` (a fresh one for the demo):
    with another `init` only the `model` fields given here apply over that checkpoint's config.
    """
    return make_preset(name, overrides)


def make_preset(
    name: str,
    overrides: dict[str, Any],
    presets: dict[str, dict[str, Any]] | None = None,
    config_class: type = TrainConfig,
):
    """`preset` for any config class (a `TrainConfig` subclass) and its table of presets."""
    presets = PRESETS if presets is None else presets
    if name not in presets:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(presets)} (--preset).")
    base = presets[name]
    overrides = dict(overrides)
    same_init = overrides.get("init", base.get("init")) == base.get("init")
    model = {**(base.get("model", {}) if same_init else {}), **overrides.pop("model", {})}
    return config_class(**{**base, **overrides, "model": model})


# ----------------------------------------------------------------------------------------------
# Command line


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_type(f: dataclasses.Field, config_class: type = TrainConfig) -> tuple[type, bool]:
    """(base type, optional) of a dataclass field annotation such as `int | None`."""
    hints = typing.get_type_hints(config_class)
    t = hints[f.name]
    optional = False
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional = len(args) < len(typing.get_args(t))
        t = args[0]
    return t, optional


def check_model_field(name: str) -> None:
    """A `ValueError` naming the fix unless `name` is a field `--model` may set."""
    if name in _RUN_OPTIONS:
        raise ValueError(f"model.{name} is a setting of its own: use --{_flag(name)} instead of --model {name}=...")
    if name in _TOKENIZER_FIELDS:
        raise ValueError(f"model.{name} comes from the tokenizer's special tokens; leave it out of --model.")
    if name not in MODEL_FIELDS:
        raise ValueError(f"model.{name} is not a LongformerConfig field; known: {', '.join(MODEL_FIELDS)}.")


def _split_item(flag: str, item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(
            f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} "
            f"{'hidden_size=256' if flag == '--model' else 'learning_rate=3e-4'}."
        )
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def _parse_value(name: str, raw: str, config_class: type = TrainConfig) -> Any:
    f = {f.name: f for f in dataclasses.fields(config_class)}.get(name)
    if f is None or name == "model":
        hint = f" ({name} is a model field: use --model {name}=...)" if name in MODEL_FIELDS else ""
        known = sorted(x.name for x in dataclasses.fields(config_class) if x.name != "model")
        raise ValueError(
            f"--set {name}=...: unknown setting {name!r}{hint}; known settings: {', '.join(known)}, model.KEY."
        )
    t, optional = _field_type(f, config_class)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    if t is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{_flag(name)} {raw!r}: expected true or false.")
    try:
        return t(raw)
    except ValueError:
        raise ValueError(f"--{_flag(name)} {raw!r}: expected a value of type {t.__name__}.") from None


def parse_model_value(name: str, raw: str) -> Any:
    """A `--model name=raw` value: text for string fields, JSON otherwise (`8`, `[4, 8]`, `1e-5`)."""
    check_model_field(name)
    hint = typing.get_type_hints(LongformerConfig)[name]
    if raw.lower() in ("none", "null"):
        return None
    if hint is str:
        return raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"--model {name}={raw!r}: expected a number, true/false or a JSON list.") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def _arg_type(name: str, config_class: type = TrainConfig):
    def convert(raw: str):
        try:
            return _parse_value(name, raw, config_class)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def build_parser(
    config_class: type = TrainConfig,
    presets: dict[str, dict[str, Any]] | None = None,
    *,
    prog: str = "python -m train.pretrain",
    default_preset: str = "demo",
    description: str = "Masked-LM pretraining of a Longformer (Optax, Orbax), from one CPU to a TPU pod.",
    hidden: tuple[str, ...] = (),
    parser_class: type = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """The command line of `config_class`: one flag per field (but `hidden`), `--model`, `--set`, `--preset`.

    Defaults in the help are those of `presets[default_preset]`."""
    presets = PRESETS if presets is None else presets
    p = parser_class(prog=prog, description=description)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting by its config.json name, model fields as model.KEY (repeatable)",
    )
    p.add_argument(
        "--mesh",
        default=None,
        metavar="data=N,fsdp=M,sequence=S",
        help="the device mesh: batch rows over data x fsdp (parameters sharded over fsdp), each "
        "row's tokens over sequence; data=-1 takes the remaining devices (default data=-1,fsdp=1,"
        "sequence=1; the same as --mesh-data, --mesh-fsdp, --mesh-sequence)",
    )
    p.add_argument(
        "--model",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="a LongformerConfig field of the model (repeatable; values in JSON, e.g. "
        f"attention_window=[4,8]); {default_preset} preset: "
        f"{presets[default_preset].get('model', {})}; fields: {', '.join(MODEL_FIELDS)}",
    )
    for f in dataclasses.fields(config_class):
        if f.name in ("model", *hidden):
            continue
        t, optional = _field_type(f, config_class)
        default = config_class.__dataclass_fields__[f.name].default
        shown = presets[default_preset].get(f.name, default)
        help_ = f"{t.__name__}{' or none' if optional else ''} ({default_preset} preset: {shown!r})"
        if f.name == "preset":
            p.add_argument("--preset", default=default_preset, choices=sorted(presets), help="named recipe")
        elif t is bool:
            p.add_argument(
                f"--{_flag(f.name)}",
                dest=f.name,
                default=argparse.SUPPRESS,
                action=argparse.BooleanOptionalAction,
                help=help_,
            )
        else:
            p.add_argument(
                f"--{_flag(f.name)}",
                dest=f.name,
                default=argparse.SUPPRESS,
                metavar=t.__name__.upper(),
                type=_arg_type(f.name, config_class),
                help=help_,
            )
    add_target_flags(p)  # read first by train.aot.split_args; here for --help
    return p


def add_target_flags(p: argparse.ArgumentParser, defaults: Any = argparse.SUPPRESS) -> None:
    """The flags that size a run for an accelerator target instead of training (`train.aot`, docs/sizing.md).

    ``defaults``: SUPPRESS in a program's own parser (there for --help: `train.aot.split_args` takes
    them out of the command line first), None in the parser that reads them."""
    given = defaults is argparse.SUPPRESS
    g = p.add_argument_group("sizing for a TPU or GPU target, on this host's CPU (nothing is trained; docs/sizing.md)")
    g.add_argument(
        "--target",
        default=defaults,
        metavar="NAME",
        help="a TPU slice (v4-8, v5e-8, v5p-8, v6e-8, ...), a JAX topology name (v5e:4x4) or GPUs on one host "
        "(h100, h200, a100-80g, h100x8); needs --compile-only and the aot extra",
    )
    g.add_argument(
        "--compile-only",
        action="store_true",
        default=defaults if given else False,
        help="compile this run's train and evaluation steps for --target and print memory per device, whether it "
        "fits and a step-time bound (exit 1 when it does not fit)",
    )
    g.add_argument("--report", default=defaults, metavar="FILE", help="also write the report as JSON")
    g.add_argument(
        "--fit",
        action="store_true",
        default=defaults if given else False,
        help="compile and compare micro-batch (global batch kept), remat and attention implementation; print the "
        "fastest settings that fit",
    )
    g.add_argument(
        "--fit-headroom",
        type=float,
        default=defaults if given else 0.1,
        metavar="FRACTION",
        help="the share of the chip's usable memory that --fit leaves free for what the compiler does not see "
        "(runtime buffers, fragmentation; default 0.1)",
    )
    g.add_argument(
        "--num-labels",
        type=int,
        default=defaults,
        metavar="N",
        help="fine-tuning with --compile-only: the head's number of labels (no data is read)",
    )


def _mesh_settings(ns: argparse.Namespace) -> dict[str, int]:
    """`--mesh data=N,fsdp=M,sequence=S` as the settings mesh_data, mesh_fsdp, mesh_sequence."""
    given = [f"--{_flag(k)}" for k in ("mesh_data", "mesh_fsdp", "mesh_sequence") if hasattr(ns, k)]
    if given:
        raise ValueError(f"--mesh and {', '.join(given)} both set the mesh; give the whole mesh with --mesh only.")
    return {f"mesh_{axis}": size for axis, size in parse_mesh(ns.mesh).items()}


def parse_args(
    argv: list[str] | None = None,
    config_class: type = TrainConfig,
    presets: dict[str, dict[str, Any]] | None = None,
    parser: argparse.ArgumentParser | None = None,
):
    """Preset values, then `--set key=value`, then `--model` and the per-field flags; validated.

    `config_class`, `presets` and `parser` (from `build_parser` of them) serve another program's config."""
    ns = (parser or build_parser()).parse_args(argv)
    overrides: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for item in ns.set:
        k, v = _split_item("--set", item)
        if k.startswith("model."):
            model[k[len("model.") :]] = parse_model_value(k[len("model.") :], v)
        else:
            overrides[k] = _parse_value(k, v, config_class)
    for item in ns.model:
        k, v = _split_item("--model", item)
        model[k] = parse_model_value(k, v)
    if ns.mesh is not None:
        overrides.update(_mesh_settings(ns))
    for f in dataclasses.fields(config_class):
        if f.name not in ("preset", "model") and hasattr(ns, f.name):
            overrides[f.name] = getattr(ns, f.name)
    cfg = make_preset(ns.preset, {**overrides, "model": model}, presets, config_class)
    cfg.validate()
    return cfg
