"""LongformerConfig: the Hugging Face ``config.json`` fields, validated, plus JAX-side options.

The HF fields keep their names and meanings (``../shared/SPEC.md``, Config). ``attention_window`` is
the FULL window (``w = attention_window // 2`` keys on each side), as in ``transformers``. allenai's
original configs store a one-sided window; :meth:`LongformerConfig.from_dict` recognises them and
doubles it.

JAX-side options (``dtype``, ``remat``, ``scan_layers``, ``attention_block_size``,
``attention_implementation``) are never written to ``config.json``; a Flax checkpoint keeps them
beside it (``longformer_jax.pretrained``).

Two of them change what the model computes, and ``transformers`` has neither (the attention patterns
of allenai's original Longformer, read from its configs):

- ``attention_dilation``: dilated sliding windows. Query ``i`` of a layer with dilation ``d`` sees the
  keys ``i + d*k`` for ``k`` in ``-w .. w``. An int (every layer, every head), or one entry per layer,
  each an int or a tuple of one int per head (some heads dilated, the others not).
- ``causal_attention``: causal sliding windows, every attention restricted to keys ``j <= i``.

A config that uses them has no HF ``config.json`` (``to_hf_dict`` refuses: transformers would load it
as a different model); such a model lives in the Flax checkpoint format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# The fields of HF's LongformerConfig (and its PretrainedConfig parents) that the model reads.
_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "attention_window",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "num_labels",
    "problem_type",
    "id2label",
    "label2id",
    "tie_word_embeddings",
)

# Keys that only allenai's original (pre-transformers) Longformer configs carry.
_ALLENAI_KEYS = ("attention_mode", "attention_dilation", "autoregressive")

# The settings of the attention pattern that transformers lacks (they change the model's meaning).
PATTERN_FIELDS = ("attention_dilation", "causal_attention")

JAX_FIELDS = ("dtype", "remat", "scan_layers", "attention_block_size", "attention_implementation", *PATTERN_FIELDS)

# The implementations of the band attention (``longformer_jax.kernels`` runs them): "blocked" is the
# plain-JAX reference, "splash" a TPU kernel, "pallas-gpu" a GPU kernel, "auto" the backend's kernel.
ATTENTION_IMPLEMENTATIONS = ("blocked", "splash", "pallas-gpu", "auto")

# config.json model types whose weights convert.roberta_to_longformer turns into a long Longformer.
ROBERTA_MODEL_TYPES = ("roberta", "xlm-roberta")


def check_model_type(d: dict[str, Any]) -> None:
    """Accepts a Longformer config.json dict: model_type 'longformer' (or none), or allenai's original
    release (model_type 'roberta' with ``attention_window`` or their own keys). Anything else, a plain
    RoBERTa config included, is a ValueError saying what to do instead. The one place this is decided."""
    model_type = d.get("model_type")
    if model_type in (None, "longformer") or any(k in d for k in _ALLENAI_KEYS):
        return
    if model_type == "roberta" and "attention_window" in d:  # allenai's original release
        return
    if model_type in ROBERTA_MODEL_TYPES:
        raise ValueError(
            f"config.json has model_type={model_type!r} and no attention_window: a RoBERTa checkpoint, not a "
            "Longformer. Make a long model from it first: "
            "python -m convert.roberta_to_longformer SRC DST --max-length 4096."
        )
    raise ValueError(
        f"config.json has model_type={model_type!r}; a Longformer config is expected (model_type 'longformer'). "
        "Convert a RoBERTa checkpoint with `python -m convert.roberta_to_longformer`; other architectures "
        "are not supported."
    )


@dataclasses.dataclass(frozen=True)
class LongformerConfig:
    """Configuration of a Longformer model; HF defaults, as ``transformers.LongformerConfig``.

    Real checkpoints differ from these defaults (the seed checkpoint has vocab 50265, 4099
    positions, layer_norm_eps 1e-5, type_vocab_size 1): load their ``config.json``.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    attention_window: int | tuple[int, ...] = 512
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    sep_token_id: int = 2
    num_labels: int = 2
    problem_type: str | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    tie_word_embeddings: bool = True
    # Fields of config.json this class does not model, kept so that a round trip loses nothing.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # --- JAX-side options (not written to config.json) ---
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16" (params stay float32)
    remat: bool = False  # rematerialise each layer in the backward pass
    scan_layers: bool = False  # one lax.scan over the layers (needs one window for all layers)
    attention_block_size: int | None = None  # query rows per block of the band; None = largest divisor of w <= 128
    attention_implementation: str = "blocked"  # one of ATTENTION_IMPLEMENTATIONS (longformer_jax.kernels)
    # --- attention patterns transformers lacks (JAX-side too: kept in Flax checkpoints, never in config.json) ---
    # Dilation of the sliding window: an int, or one per layer, each an int or a tuple of one int per head.
    attention_dilation: int | tuple[int | tuple[int, ...], ...] = 1
    causal_attention: bool = False  # every attention restricted to keys j <= i (autoregressive)

    def __post_init__(self):
        if isinstance(self.attention_window, list):
            object.__setattr__(self, "attention_window", tuple(self.attention_window))
        if isinstance(self.attention_dilation, (list, tuple)):
            dil = tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in self.attention_dilation)
            object.__setattr__(self, "attention_dilation", dil)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(msg):
            raise ValueError(f"LongformerConfig: {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                fail(f"{name}={v!r} must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            fail(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; choose heads that divide the hidden size "
                f"(e.g. {_divisors_hint(self.hidden_size)})."
            )
        windows = self.attention_window
        if isinstance(windows, tuple):
            if len(windows) != self.num_hidden_layers:
                fail(
                    f"attention_window has {len(windows)} entries but num_hidden_layers="
                    f"{self.num_hidden_layers}; give one window per layer or a single int."
                )
        else:
            windows = (windows,)
        for i, w in enumerate(windows):
            where = f"attention_window[{i}]" if isinstance(self.attention_window, tuple) else "attention_window"
            if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
                fail(f"{where}={w!r} must be a positive even integer (the full window, both sides).")
            if w % 2:
                fail(
                    f"{where}={w} is odd; the window is the full width (w//2 keys each side) and must be "
                    f"even, e.g. {w + 1}. (allenai's one-sided configs store half: pass 2*{w}.)"
                )
        largest = max(windows)
        for i, w in enumerate(windows):
            if largest % w:
                fail(
                    f"attention_window[{i}]={w} does not divide the largest window {largest}; inputs are "
                    f"padded to a multiple of {largest} and every layer's window must divide it "
                    f"(e.g. use windows like [4, 8] or [64, 128, 256])."
                )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            fail(f"dtype={self.dtype!r}; expected 'float32', 'bfloat16' or 'float16'.")
        if self.hidden_act not in _ACTIVATIONS:
            fail(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}.")
        if self.scan_layers and len(set(windows)) > 1:
            fail(
                f"scan_layers=True needs the same window on every layer, got {list(windows)}; "
                "set scan_layers=False for per-layer windows."
            )
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            fail(
                f"attention_implementation={self.attention_implementation!r} is not known; choose one of "
                f"{', '.join(repr(n) for n in ATTENTION_IMPLEMENTATIONS)} ('blocked' is the plain-JAX reference, "
                "'auto' the fastest exact one for the backend)."
            )
        self._validate_patterns(fail)
        if self.attention_block_size is not None:
            for w in windows:
                if self.attention_block_size <= 0 or (w // 2) % self.attention_block_size:
                    fail(
                        f"attention_block_size={self.attention_block_size} must be a positive divisor of "
                        f"every one-sided window (attention_window // 2 = {w // 2})."
                    )

    def _validate_patterns(self, fail) -> None:
        """The dilation (per layer, per head) and the causal switch: types, lengths, and what needs them."""
        dil, layers, heads = self.attention_dilation, self.num_hidden_layers, self.num_attention_heads
        positive = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1
        hint = (
            f"give an int >= 1 (every layer), or {layers} entries (one per layer), each an int or a tuple of "
            f"{heads} ints (one per head)"
        )
        if isinstance(dil, tuple):
            if len(dil) != layers:
                fail(f"attention_dilation has {len(dil)} entries but num_hidden_layers={layers}; {hint}.")
            for i, d in enumerate(dil):
                per_head = d if isinstance(d, tuple) else (d,)
                if isinstance(d, tuple) and len(d) != heads:
                    fail(f"attention_dilation[{i}] has {len(d)} entries but num_attention_heads={heads}; {hint}.")
                if not all(positive(x) for x in per_head):
                    fail(f"attention_dilation[{i}]={d!r} must hold integers >= 1 (1: no dilation); {hint}.")
        elif not positive(dil):
            fail(f"attention_dilation={dil!r} must be an integer >= 1 (1: no dilation); {hint}.")
        if not isinstance(self.causal_attention, bool):
            fail(f"causal_attention={self.causal_attention!r} must be True or False.")
        if self.scan_layers and len(set(self.attention_dilations)) > 1:
            fail(
                f"scan_layers=True needs the same attention_dilation on every layer, got {dil!r}; "
                "set scan_layers=False for per-layer dilations."
            )
        if self.has_attention_pattern and self.attention_implementation not in ("blocked", "auto"):
            fail(
                f"attention_implementation={self.attention_implementation!r} runs only the two-sided, undilated "
                f"band, but this model sets {self.pattern_description()}; use 'blocked' (or 'auto', which takes "
                "'blocked' for them)."
            )

    # ------------------------------------------------------------------ derived
    @property
    def attention_dilations(self) -> tuple[int | tuple[int, ...], ...]:
        """The dilation of every layer: an int, or a tuple of one int per head."""
        if isinstance(self.attention_dilation, tuple):
            return self.attention_dilation
        return (self.attention_dilation,) * self.num_hidden_layers

    @property
    def is_dilated(self) -> bool:
        """Whether some head of some layer has a dilation other than 1."""
        return any(x != 1 for d in self.attention_dilations for x in (d if isinstance(d, tuple) else (d,)))

    @property
    def has_attention_pattern(self) -> bool:
        """Whether the model uses an attention pattern transformers lacks (dilated or causal windows)."""
        return self.causal_attention or self.is_dilated

    def pattern_description(self) -> str:
        """The pattern settings in use, as ``name=value`` for messages."""
        parts = [f"attention_dilation={self.attention_dilation!r}"] if self.is_dilated else []
        return ", ".join(parts + (["causal_attention=True"] if self.causal_attention else [])) or "no pattern"

    @property
    def pad_multiple(self) -> int:
        """Inputs are padded to a multiple of this: every layer's window times its dilations.

        A layer of window ``2w`` and dilation ``d`` runs an ordinary band on each of the ``d`` subsequences
        of positions with the same residue mod ``d``, which needs ``L`` a multiple of ``2w * d``. Without
        dilation this is the largest window (the windows divide it), as in transformers."""
        per_layer = (
            w * math.lcm(*(d if isinstance(d, tuple) else (d,)))
            for w, d in zip(self.attention_windows, self.attention_dilations)
        )
        return math.lcm(*per_layer)

    @property
    def attention_windows(self) -> tuple[int, ...]:
        """The full window of every layer."""
        if isinstance(self.attention_window, tuple):
            return self.attention_window
        return (self.attention_window,) * self.num_hidden_layers

    @property
    def max_window(self) -> int:
        return max(self.attention_windows)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """The longest input: positions start at pad_token_id + 1."""
        return self.max_position_embeddings - self.pad_token_id - 1

    def replace(self, **changes) -> LongformerConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> LongformerConfig:
        """A config from a config.json dict (HF's, or allenai's original), then ``overrides``.

        allenai's originals (``is_allenai_config``): the one-sided window is doubled, their
        ``attention_dilation`` (per layer) and ``autoregressive`` become ``attention_dilation`` and
        ``causal_attention``. Other JAX-side fields in ``d`` are ignored, except the pattern settings
        (``PATTERN_FIELDS``, as ``to_dict`` writes them): dropping them would make a different model."""
        d = dict(d)
        check_model_type(d)
        kwargs: dict[str, Any] = {}
        if is_allenai_config(d):
            kwargs.update(_read_allenai(d))
        for k in _HF_FIELDS + PATTERN_FIELDS:
            if k in d:
                kwargs[k] = d.pop(k)
        if kwargs.get("id2label") is not None:
            kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
            kwargs.setdefault("num_labels", len(kwargs["id2label"]))
        if kwargs.get("id2label") is not None:
            kwargs["num_labels"] = len(kwargs["id2label"])
            if kwargs["id2label"] == {i: f"LABEL_{i}" for i in range(kwargs["num_labels"])}:
                kwargs["id2label"] = kwargs["label2id"] = None  # the default names: nothing to keep
        for k in JAX_FIELDS:
            d.pop(k, None)
        aw = kwargs.get("attention_window")
        if isinstance(aw, list):
            kwargs["attention_window"] = tuple(aw)
        dropped = set(_ALLENAI_KEYS) | {"model_type", "architectures", "transformers_version"}
        kwargs["extra"] = {k: v for k, v in d.items() if not k.startswith("_") and k not in dropped}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> LongformerConfig:
        """Read ``config.json`` from a directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ValueError(f"no config.json at {path!r}; expected an HF model directory or a config.json path.")
        with open(file) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from None
        return cls.from_dict(d, **overrides)

    def check_hf_compatible(self) -> None:
        """A ValueError when transformers has no model for this config (dilated or causal windows)."""
        if self.has_attention_pattern:
            raise ValueError(
                f"LongformerConfig: {self.pattern_description()} has no counterpart in transformers' Longformer: "
                "an HF config.json of this model would load there as a model with plain two-sided windows, "
                "silently different. Keep it in this library's Flax checkpoint format, which stores these "
                "settings (longformer_jax.pretrained.save_flax_checkpoint; python -m train.export --format flax)."
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that ``transformers`` reads (model_type longformer).

        Raises:
            ValueError: for a model with an attention pattern transformers lacks (``check_hf_compatible``).
        """
        self.check_hf_compatible()
        return self._hf_fields()

    def _hf_fields(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        for k in _HF_FIELDS:
            v = getattr(self, k)
            if k == "attention_window" and isinstance(v, tuple):
                v = list(v)
            if k in ("id2label", "label2id", "problem_type") and v is None:
                continue
            if k == "id2label":
                v = {str(i): lab for i, lab in v.items()}
            d[k] = v
        if self.id2label is None:
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        d.pop("num_labels", None)  # transformers derives it from id2label
        d["model_type"] = "longformer"
        d.setdefault("onnx_export", False)
        return dict(sorted(d.items()))

    def to_dict(self) -> dict[str, Any]:
        """Every field: the config.json fields and the JAX-side ones (the pattern settings among them)."""
        d = self._hf_fields()
        for k in JAX_FIELDS:
            v = getattr(self, k)
            d[k] = json.loads(json.dumps(v)) if isinstance(v, tuple) else v
        return d

    def save_pretrained(
        self, directory: str | os.PathLike, architectures: list[str] | None = None, *, hf_export: bool = True
    ) -> str:
        """Writes ``directory/config.json`` (HF fields only); returns its path.

        ``hf_export=False``: the config.json of a Flax checkpoint, which keeps the JAX-side settings (the
        attention patterns among them) in its own file beside it; transformers loads no model from such
        a directory (it holds no PyTorch weights). Otherwise a model with an attention pattern
        transformers lacks is a ValueError (``check_hf_compatible``)."""
        if hf_export:
            self.check_hf_compatible()
        os.makedirs(directory, exist_ok=True)
        d = self._hf_fields()
        if architectures:
            d["architectures"] = list(architectures)
        file = os.path.join(directory, "config.json")
        with open(file, "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")
        return file


def is_allenai_config(d: dict[str, Any]) -> bool:
    """Whether ``d`` is an allenai original config (one-sided windows): one of their keys, except an
    ``attention_dilation`` under model_type 'longformer' alone (this library's ``to_dict`` writes it so,
    with a full window)."""
    if "attention_mode" in d or "autoregressive" in d:
        return True
    return "attention_dilation" in d and d.get("model_type") != "longformer"


def _read_allenai(d: dict[str, Any]) -> dict[str, Any]:
    """The fields of an allenai original config (removing their keys from ``d``): the window doubled, the
    dilation (per layer) and ``autoregressive`` as ``causal_attention``."""
    mode = d.get("attention_mode")
    if mode not in (None, "longformer", "sliding_chunks", "tvm", "sliding_chunks_no_overlap"):
        raise ValueError(f"allenai config attention_mode={mode!r} is not supported.")
    dil = d.pop("attention_dilation", 1)
    out: dict[str, Any] = {"causal_attention": bool(d.pop("autoregressive", False) or False)}
    if dil not in (None, 1) and not (isinstance(dil, list) and all(x == 1 for x in dil)):
        out["attention_dilation"] = tuple(dil) if isinstance(dil, list) else dil
    aw = d.pop("attention_window", 512)
    out["attention_window"] = [2 * x for x in aw] if isinstance(aw, list) else 2 * aw
    return out


_ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh"}


def _divisors_hint(n: int) -> str:
    return ", ".join(str(k) for k in range(2, min(n, 32) + 1) if n % k == 0) or "1"
