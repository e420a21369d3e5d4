"""What both sides of the benchmark share: the case, its inputs, its FLOPs, and memory readings.

A case is one (framework, sequence length, window, number of global tokens) with the modes to time
(``fwd``: encoder forward pass; ``train``: forward, backward and AdamW update of the encoder with a
token-classification head). A case with ``task="mlm"`` is the pretraining step instead: the masked-LM
train step in the seed's layout (``mlm_inputs``), JAX with the LM head at the masked positions only,
PyTorch with ``transformers``' full-vocabulary head. It is a plain dict so that it travels to a
worker process as JSON.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import time

import numpy as np

from longformer_jax import flops

# The base model (kiddothe2b/longformer-base-4096 and allenai/longformer-base-4096 sizes).
BASE = dict(
    vocab_size=50265,
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    sep_token_id=2,
)
NUM_LABELS = 2  # token-classification head of the train step
MLM_PROBABILITY = 0.15  # the seed recipe's masking rate
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
DROPOUT = 0.1  # hidden and attention dropout in the train step (as in pretraining); off in fwd
# glibc settings that keep freed memory in the heap instead of returning it to the kernel, so that
# large buffers are not page-faulted in again on every call. Applied to both frameworks alike.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def model_kwargs(case: dict) -> dict:
    """The model config of the case: the base size unless the case gives a size (a tiny smoke-test case)."""
    L = case["length"]
    sizes = {k: case[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size") if k in case}
    return dict(
        BASE,
        **sizes,
        num_hidden_layers=case["layers"],
        attention_window=case["window"],
        # RoBERTa positions: real tokens take pad+1 .. L+pad, so L + 2 rows.
        max_position_embeddings=L + BASE["pad_token_id"] + 1,
    )


def global_positions(length: int, num_global: int) -> np.ndarray:
    """The sentence-block layout: one global token at the start of each of ``num_global`` equal blocks.

    At 4096 tokens and 32 globals these are the seed checkpoint's 128-token block starts."""
    if num_global == 0:
        return np.zeros((0,), np.int64)
    return np.arange(num_global) * (length // num_global)


def inputs(case: dict) -> dict[str, np.ndarray]:
    """Token ids, masks and labels of the case, the same on both sides (int64; cast as needed)."""
    B, L = case["batch"], case["length"]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, BASE["vocab_size"], (B, L))
    glob = np.zeros((B, L), np.int64)
    pos = global_positions(L, case["globals"])
    glob[:, pos] = 1
    ids[:, pos] = BASE["eos_token_id"]  # a block starts with </s>
    ids[:, 0] = BASE["bos_token_id"]
    return {
        "input_ids": ids,
        "attention_mask": np.ones((B, L), np.int64),
        "global_attention_mask": glob,
        "labels": rng.integers(0, NUM_LABELS, (B, L)),
    }


def mlm_inputs(case: dict) -> dict[str, np.ndarray]:
    """The seed's pretraining layout, masked: the same arrays on both sides (int64; cast as needed).

    Each sequence is ``length // block`` blocks of ``block`` tokens (the seed: 32 of 128); a block
    starts with ``<s>`` (the first) or ``</s>``, holds at most ``block - 1`` tokens and is padded with
    ``<pad>`` INSIDE the sequence (attention mask 0 there); global attention on every block start.
    fairseq's RoBERTa masking at 15% (``train.masking.mask_tokens``) gives ``labels`` per token (what
    ``transformers`` takes) and the slots ``masked_positions`` / ``masked_labels`` (what this project's
    masked-only LM head takes)."""
    from train.masking import MaskingSpec, mask_tokens

    B, L, blk = case["batch"], case["length"], case["block"]
    pad, bos, eos = BASE["pad_token_id"], BASE["bos_token_id"], BASE["eos_token_id"]
    mask_id = case.get("vocab_size", BASE["vocab_size"]) - 1  # RoBERTa's <mask> (50264): the last id
    rng = np.random.default_rng(0)
    ids = np.full((B, L), pad, np.int64)
    for b in range(B):
        for n in range(L // blk):
            start, fill = n * blk, int(rng.integers(blk // 2, blk))  # at most blk - 1 tokens, then pads
            ids[b, start] = bos if n == 0 else eos
            ids[b, start + 1 : start + fill] = rng.integers(4, mask_id, fill - 1)
    am = (ids != pad).astype(np.int64)
    gm = np.zeros((B, L), np.int64)
    gm[:, ::blk] = 1
    spec = MaskingSpec(
        mask_id=mask_id,
        special_ids=np.array([bos, pad, eos, 3, mask_id]),
        random_ids=np.arange(4, mask_id),
        mlm_probability=MLM_PROBABILITY,
    )
    out = mask_tokens({"input_ids": ids, "attention_mask": am, "global_attention_mask": gm}, rng, spec)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


def case_inputs(case: dict) -> dict[str, np.ndarray]:
    """The inputs of the case: ``mlm_inputs`` for the masked-LM step, else ``inputs``."""
    return mlm_inputs(case) if case.get("task") == "mlm" else inputs(case)


def masked_tokens(case: dict) -> int:
    """How many tokens of the masked-LM case carry a label (where the LM head is needed)."""
    return int((mlm_inputs(case)["labels"] != -100).sum())


def forward_flops(case: dict, dense: bool = False) -> float:
    """Matrix-product FLOPs of one forward pass of the encoder (per batch), of the exact model
    (``longformer_jax.flops``, which the sizing reports of ``train.aot`` use too). ``dense``: the plain O(L^2)
    attention of the same sizes, without the global projections. Sizes other than the base model's
    come from the case (``hidden_size``, ``intermediate_size``, ``num_attention_heads``). The head is
    the token classifier of the train step, or for the masked-LM case the LM head at the
    ``masked_tokens`` labelled tokens (what the loss needs; a full-vocabulary head at every position
    does more)."""
    E = case.get("hidden_size", BASE["hidden_size"])
    L, B = case["length"], case["batch"]
    per_layer = flops.encoder_layer_flops(
        hidden=E,
        intermediate=case.get("intermediate_size", BASE["intermediate_size"]),
        heads=case.get("num_attention_heads", BASE["num_attention_heads"]),
        length=L,
        window=case["window"],
        globals_=case["globals"],
        dense=dense,
    )
    head = 2 * L * E * NUM_LABELS if case.get("mode") == "train" else 0
    if case.get("task") == "mlm":  # the LM head (dense, decoder) where a token is masked
        V = case.get("vocab_size", BASE["vocab_size"])
        return float(
            B * case["layers"] * per_layer + flops.mlm_head_flops(hidden=E, vocab_size=V, tokens=case["masked_tokens"])
        )
    return float(B * (case["layers"] * per_layer + head))


def step_flops(case: dict, mode: str, dense: bool = False) -> float:
    """Forward: the forward FLOPs; train: 3x (the backward pass does two products per forward one)."""
    f = forward_flops(dict(case, mode=mode), dense)
    return f if mode == "fwd" else 3.0 * f


# ---------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak resident memory of this process above a baseline (Linux: VmHWM after clear_refs)."""

    def __init__(self):
        self.reset()

    def reset(self):
        gc.collect()
        _malloc_trim()  # hand freed heap pages back, so that reusing them later counts as new memory
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.baseline_kib = _status_kib("VmRSS")

    def peak_bytes(self) -> int:
        return max(0, _status_kib("VmHWM") - self.baseline_kib) * 1024


# ---------------------------------------------------------------------------------------- timing
def warmup_calls(case: dict) -> int:
    """Untimed calls before the timed ones (``reps["warmup"]``, default 1)."""
    r = case.get("reps")
    return int(r.get("warmup", 1)) if isinstance(r, dict) else 1


def time_calls(fn, reps: int, warmup: int = 1, after_first=None) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` (which must block until its result is ready).

    ``after_first()`` runs right after the first (warm-up) call, to read that call's memory; more
    warm-up calls let the allocator's heap reach its steady size before anything is timed."""
    for i in range(warmup):
        fn()
        if i == 0 and after_first is not None:
            after_first()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def emit(result: dict) -> None:
    """The worker's answer: one JSON line on stdout, marked so that library logs cannot be mistaken for it."""
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
